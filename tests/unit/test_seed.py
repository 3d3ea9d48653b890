"""The synthetic data generator: determinism, referential integrity, shape and dates.

``benchmark()`` at the bottom measures the generator's rate; it is not a test. Run it with
``PYTHONPATH=. python tests/unit/test_seed.py [patients]``.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import pytest

from exportsvc.fhir.compartment import patient_ids
from exportsvc.seed import DEFAULT_NOW, WINDOW, generate

NOW = datetime(2024, 6, 30, 12, 34, 56, 789000, tzinfo=UTC)
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
DATE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
CLINICAL = (  # (element, sub-element or "") holding a clinical date or time
    ("effectiveDateTime", ""),
    ("issued", ""),
    ("onsetDateTime", ""),
    ("recordedDate", ""),
    ("abatementDateTime", ""),
    ("authoredOn", ""),
    ("occurrenceDateTime", ""),
    ("period", "start"),
    ("period", "end"),
    ("performedPeriod", "start"),
    ("performedPeriod", "end"),
)
TYPES = {
    "Organization",
    "Practitioner",
    "Patient",
    "Encounter",
    "Observation",
    "Condition",
    "MedicationRequest",
    "Procedure",
    "Immunization",
    "DiagnosticReport",
    "Provenance",
    "Group",
}


@cache
def sample(patients: int = 40, seed: int = 7) -> tuple[dict[str, Any], ...]:
    return tuple(generate(patients, seed=seed, now=NOW))


def references(node: Any) -> Iterator[str]:
    """Every ``reference`` string anywhere below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


# -- determinism ----------------------------------------------------------------------


def test_same_arguments_same_output() -> None:
    assert list(generate(5, seed=3, now=NOW)) == list(generate(5, seed=3, now=NOW))


def test_default_now_is_fixed() -> None:
    assert list(generate(2, seed=3)) == list(generate(2, seed=3, now=DEFAULT_NOW))


def test_naive_now_means_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    assert list(generate(2, now=naive)) == list(generate(2, now=NOW))


def test_other_seed_or_now_other_output() -> None:
    base = list(generate(5, seed=3, now=NOW))
    assert list(generate(5, seed=4, now=NOW)) != base
    later = list(generate(5, seed=3, now=NOW + timedelta(days=1)))
    assert [r["id"] for r in later] == [r["id"] for r in base]  # same draws, shifted dates
    assert [r["meta"] for r in later] != [r["meta"] for r in base]


def test_does_not_use_or_touch_the_global_random() -> None:
    state = random.getstate()
    random.seed(1)
    first = list(generate(3, now=NOW))
    random.seed(2)
    assert list(generate(3, now=NOW)) == first
    random.setstate(state)


def test_prefix_is_stable_when_more_patients_are_asked_for() -> None:
    small, large = list(generate(3, now=NOW)), list(generate(6, now=NOW))
    patients_block = [r for r in small if r["resourceType"] != "Group"]
    assert large[: len(patients_block)] == patients_block


def test_negative_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="patients"):
        generate(-1)


# -- ids and references ---------------------------------------------------------------


def test_ids_are_unique_fhir_ids_and_uuid4() -> None:
    ids = [r["id"] for r in sample()]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        assert FHIR_ID.fullmatch(rid)
        assert str(uuid.UUID(rid)) == rid
        assert uuid.UUID(rid).version == 4


def test_every_reference_points_at_an_earlier_resource() -> None:
    seen: set[str] = set()
    count = 0
    for resource in sample():
        for ref in references(resource):
            assert ref in seen, f"{resource['resourceType']}/{resource['id']} -> {ref}"
            count += 1
        seen.add(f"{resource['resourceType']}/{resource['id']}")
    assert count > len(seen)


def test_references_are_not_shared_between_resources() -> None:
    a, b, *_ = (r for r in sample() if r["resourceType"] == "Observation")
    assert a["subject"] == b["subject"]
    assert a["subject"] is not b["subject"]


def test_each_clinical_resource_is_in_one_patients_compartment() -> None:
    patient = ""
    for resource in sample():
        rtype = resource["resourceType"]
        if rtype in ("Organization", "Practitioner"):
            assert patient_ids(resource) == set()
        elif rtype == "Patient":
            patient = resource["id"]
            assert patient_ids(resource) == {patient}
        elif rtype != "Group":
            assert patient_ids(resource) == {patient}, resource


# -- shape ------------------------------------------------------------------------------


def test_all_types_in_synthea_order_and_proportions() -> None:
    resources = sample()
    counts = Counter(r["resourceType"] for r in resources)
    assert set(counts) == TYPES
    assert counts["Patient"] == 40
    assert counts["Group"] == 3
    assert {r["resourceType"] for r in resources[:25]} == {"Organization", "Practitioner"}
    assert [r["resourceType"] for r in resources[-3:]] == ["Group"] * 3
    assert resources[25]["resourceType"] == "Patient"
    per_patient = (len(resources) - 28) / 40
    assert 40 <= per_patient <= 70
    assert counts["Observation"] > (len(resources) - 28) / 2


def test_codes_and_required_elements() -> None:
    for r in sample():
        rtype = r["resourceType"]
        if rtype == "Observation":
            assert r["code"]["coding"][0]["system"] == "http://loinc.org"
            category = r["category"][0]["coding"][0]
            assert category["system"] == (
                "http://terminology.hl7.org/CodeSystem/observation-category"
            )
            assert category["code"] in ("vital-signs", "laboratory")
            assert r["valueQuantity"]["system"] == "http://unitsofmeasure.org"
            assert isinstance(r["valueQuantity"]["value"], float)
        elif rtype in ("Condition", "Procedure"):
            assert r["code"]["coding"][0]["system"] == "http://snomed.info/sct"
        elif rtype == "Encounter":
            assert r["type"][0]["coding"][0]["system"] == "http://snomed.info/sct"
            assert r["class"]["code"] in ("AMB", "EMER", "IMP")
            assert r["participant"][0]["individual"]["reference"].startswith("Practitioner/")
            assert r["serviceProvider"]["reference"].startswith("Organization/")
        elif rtype == "MedicationRequest":
            coding = r["medicationCodeableConcept"]["coding"][0]
            assert coding["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"
            assert r["requester"]["reference"].startswith("Practitioner/")
            assert r["intent"] == "order"
        elif rtype == "Immunization":
            assert r["vaccineCode"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/cvx"
            assert r["patient"]["reference"].startswith("Patient/")
        elif rtype == "DiagnosticReport":
            assert r["result"]
            assert all(ref["reference"].startswith("Observation/") for ref in r["result"])
        elif rtype == "Patient":
            assert r["gender"] in ("female", "male")
            assert r["name"][0]["family"]
            assert r["address"][0]["city"]
            assert r["telecom"][0]["value"]
            assert all(identifier["system"] for identifier in r["identifier"])


def test_groups_reference_only_patients_and_overlap() -> None:
    resources = sample()
    patients = {f"Patient/{r['id']}" for r in resources if r["resourceType"] == "Patient"}
    groups = [r for r in resources if r["resourceType"] == "Group"]
    members = []
    for group in groups:
        assert (group["type"], group["actual"]) == ("person", True)
        refs = [m["entity"]["reference"] for m in group["member"]]
        assert set(refs) <= patients
        assert len(set(refs)) == len(refs) == group["quantity"]
        members.append(set(refs))
    assert min(map(len, members)) <= 5
    assert members[0] & members[1]


def test_no_patients_still_gives_the_pool_and_empty_groups() -> None:
    resources = list(generate(0, now=NOW))
    assert Counter(r["resourceType"] for r in resources) == {
        "Organization": 5,
        "Practitioner": 20,
        "Group": 3,
    }
    assert all(r["member"] == [] for r in resources if r["resourceType"] == "Group")


def test_resources_are_plain_json() -> None:
    resources = sample()
    assert json.loads(json.dumps(resources)) == list(resources)


# -- dates --------------------------------------------------------------------------------


def test_last_updated_is_an_instant_in_the_window() -> None:
    stamps = []
    for r in sample():
        assert set(r["meta"]) == {"lastUpdated"}
        stamp = r["meta"]["lastUpdated"]
        assert INSTANT.fullmatch(stamp), stamp
        stamps.append(parse(stamp))
    assert all(NOW - timedelta(days=5 * 365) <= s < NOW for s in stamps)
    # spread over the window, so a _since filter picks a real subset
    middle = NOW - WINDOW / 2
    assert 0.2 < sum(s >= middle for s in stamps) / len(stamps) < 0.8


def test_clinical_dates_do_not_follow_last_updated() -> None:
    for r in sample():
        updated = parse(r["meta"]["lastUpdated"])
        for element, part in CLINICAL:
            value = r.get(element)
            if isinstance(value, dict):
                value = value.get(part)
            elif part:
                continue
            if value is not None:
                assert DATE_TIME.fullmatch(value) or INSTANT.fullmatch(value), value
                assert NOW - WINDOW <= parse(value) <= updated, (r["resourceType"], element)
        if r["resourceType"] == "Patient":
            assert parse(r["birthDate"]).replace(tzinfo=UTC) < NOW - WINDOW


def test_period_starts_before_it_ends() -> None:
    for r in sample():
        for element in ("period", "performedPeriod"):
            if element in r:
                assert r[element]["start"] <= r[element]["end"]


# -- benchmark (not a test) -------------------------------------------------------------


def benchmark(patients: int = 20_000, rounds: int = 3) -> float:
    """The generator's best rate over ``rounds`` runs, in resources per second."""
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        count = sum(1 for _ in generate(patients, seed=1))
        best = max(best, count / (time.perf_counter() - started))
    return best


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    print(f"generate({size}): {benchmark(size):,.0f} resources/s")


def test_provenance_names_each_patients_record_and_some_are_amended() -> None:
    resources = sample()
    provenance = [r for r in resources if r["resourceType"] == "Provenance"]
    by_patient = Counter(p["target"][0]["reference"] for p in provenance)
    assert len(by_patient) == 40 and set(by_patient.values()) == {1, 2}
    for p in provenance:
        assert p["recorded"] == p["meta"]["lastUpdated"]
        assert [t["reference"].split("/")[0] for t in p["target"]][:2] == ["Patient", "Encounter"]
        assert p["agent"][0]["who"]["reference"].startswith("Practitioner/")
    amended = [p for p in provenance if p["activity"]["coding"][0]["code"] == "UPDATE"]
    for later in amended:
        first = next(p for p in provenance if p["target"] == later["target"] and p is not later)
        assert parse(first["recorded"]) < parse(later["recorded"])
