"""``_typeFilter`` and ``_elements`` exports on SQLite and PostgreSQL.

Each test seeds the store (``generate``) plus a few resources of its own, exports with
filters, and compares every type's output with a plain Python reading of the same filter
written out here by hand over every stored resource; then the DataValidator (which has
its own reading) must agree too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from datastore.resources import ExportQuery
from exportsvc.params import parse_export_request
from exportsvc.records import ExportItemRecord, ExportKind, JobStatus
from tests.integration.conftest import Harness

pytestmark = pytest.mark.parametrize(
    "harness", ["sqlite-filesystem", "postgres-filesystem"], indirect=True
)

Resource = dict[str, Any]
Predicate = Callable[[Resource], bool]
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}


def request_fields(**query: list[str]) -> dict[str, Any]:
    """The ExportRequest fields a GET with these parameters makes (parsed as the API does)."""
    pairs = [(name, value) for name, values in query.items() for value in values]
    parsed = parse_export_request(
        ExportKind.SYSTEM,
        pairs,
        method="GET",
        request_url="http://test/$export",
        prefer="respond-async",
        accept=None,
    )
    return {
        "types": parsed.types,
        "type_filters": parsed.type_filters,
        "elements": parsed.elements,
        "ignored": parsed.ignored,
    }


async def stored(harness: Harness, snapshot: int) -> dict[str, list[Resource]]:
    """Every current resource of every type as of ``snapshot``, unfiltered."""
    out: dict[str, list[Resource]] = {}
    store = harness.runtime.resources
    for type_ in await store.types(snapshot):
        page = await store.page(ExportQuery(type_, snapshot), 0, 1_000_000)
        out[type_] = [orjson.loads(raw) for raw in page.raws]
    return out


async def exported(harness: Harness, job_id: str) -> dict[str, list[Resource]]:
    view = await harness.view(job_id)
    assert view.job.status == JobStatus.COMPLETED, view.job.last_error
    dest = harness.runtime.destinations.for_job(job_id, None)
    out: dict[str, list[Resource]] = {}
    for f in view.files:
        if f.role != "output":
            continue
        body = b"".join([chunk async for chunk in dest.read(f.name)])
        out.setdefault(f.type, []).extend(orjson.loads(line) for line in body.splitlines())
    return out


async def export_and_compare(
    harness: Harness, expected: dict[str, Predicate], **query: list[str]
) -> tuple[dict[str, list[Resource]], dict[str, list[Resource]]]:
    """Export, then check each type's ids against ``expected[type]`` over the store."""
    job = await harness.submit(**request_fields(**query))
    await harness.run_all(job.id)
    everything = await stored(harness, job.snapshot_seq)
    output = await exported(harness, job.id)
    for type_, predicate in expected.items():
        want = {r["id"] for r in everything.get(type_, []) if predicate(r)}
        got = [r["id"] for r in output.get(type_, [])]
        assert len(got) == len(set(got)), f"{type_}: duplicates"
        assert set(got) == want, f"{type_}: missing {want - set(got)}, extra {set(got) - want}"
    assert set(output) <= set(expected), f"unexpected types {set(output) - set(expected)}"
    report = await harness.validate(job.id)
    assert report.ok, report.render()
    return everything, output


def codings(concepts: Any) -> set[tuple[str | None, str | None]]:
    concepts = concepts if isinstance(concepts, list) else [concepts]
    return {(c.get("system"), c.get("code")) for cc in concepts for c in cc.get("coding", [])}


def first_patient(harness_resources: list[Resource]) -> str:
    return str(harness_resources[0]["id"])


async def add(harness: Harness, *resources: Resource) -> None:
    await harness.runtime.resources.write(list(resources), keep_last_updated=True)


def meta(updated: str = "2024-05-05T10:00:00.000Z", **more: Any) -> dict[str, Any]:
    return {"lastUpdated": updated, **more}


async def test_tokens_references_dates_strings_and_meta(harness: Harness) -> None:
    await add(
        harness,
        {
            "resourceType": "Patient",
            "id": "p-mueller",
            "meta": meta(),
            "name": [{"family": "Müller", "given": ["Jürgen"]}],
        },
        {
            "resourceType": "Patient",
            "id": "p-mullins",
            "meta": meta(),
            "name": [{"family": "MULLINS", "given": ["Ann"]}],
        },
        {
            "resourceType": "Patient",
            "id": "p-amuller",
            "meta": meta(),
            "name": [{"family": "Amuller"}],
        },
        {
            "resourceType": "Practitioner",
            "id": "dr-local",
            "meta": meta(),
            "identifier": [{"system": "http://example.org/staff", "value": "17"}],
        },
        {
            "resourceType": "Organization",
            "id": "org-gold",
            "name": "Gold Clinic",
            "meta": meta(tag=[{"system": "http://example.org/tags", "code": "gold"}]),
        },
        {
            "resourceType": "Organization",
            "id": "org-silver",
            "name": "Silver Clinic",
            "meta": meta(tag=[{"system": "http://example.org/tags", "code": "silver"}]),
        },
        {
            "resourceType": "Organization",
            "id": "org-profiled",
            "name": "Profiled Clinic",
            "meta": meta(profile=["http://example.org/StructureDefinition/org"]),
        },
    )
    snapshot = await harness.runtime.resources.current_seq()
    before = await stored(harness, snapshot)
    pid = first_patient(before["Patient"])
    reports = sorted(r["id"] for r in before["DiagnosticReport"])[:2]
    await export_and_compare(
        harness,
        {
            "Observation": lambda r: (
                (CATEGORY, "laboratory") in codings(r["category"])
                or ("http://loinc.org", "8302-2") in codings(r["code"])
            ),
            "Condition": lambda r: (
                r["onsetDateTime"] >= "2023"
                and ("http://terminology.hl7.org/CodeSystem/condition-clinical", "active")
                in codings(r["clinicalStatus"])
            ),
            "Patient": lambda r: r["id"] in {"p-mueller", "p-mullins"},
            "MedicationRequest": lambda r: (
                r["status"] != "active" and r["authoredOn"][:10] <= "2023-06-30"
            ),
            "Encounter": lambda r: r["period"]["start"][:4] == r["period"]["end"][:4] == "2022",
            "Immunization": lambda r: r["meta"]["lastUpdated"] >= "2024-01-01T00:00:01",
            "DiagnosticReport": lambda r: r["id"] in reports,
            "Procedure": lambda r: r["subject"]["reference"] == f"Patient/{pid}",
            "Practitioner": lambda r: any(
                i["system"] == "http://hl7.org/fhir/sid/us-npi" for i in r["identifier"]
            ),
            "Organization": lambda r: r["id"] in {"org-gold", "org-profiled"},
            "Group": lambda r: True,
        },
        _type=[
            "Observation,Condition,Patient,MedicationRequest,Encounter,Immunization",
            "DiagnosticReport,Procedure,Practitioner,Organization,Group",
        ],
        _typeFilter=[
            "Observation?category=laboratory,Observation?code=http://loinc.org|8302-2",
            "Condition?onset-date=ge2023&clinical-status=active",
            "Patient?name=mull",
            "MedicationRequest?status:not=active&authoredon=le2023-06-30",
            "Encounter?date=2022",
            "Immunization?_lastUpdated=gt2024-01-01T00:00:00Z",
            f"DiagnosticReport?_id={reports[0]},{reports[1]}",
            f"Procedure?subject=Patient/{pid}",
            "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|",
            "Organization?_tag=http://example.org/tags|gold",
            "Organization?_profile=http://example.org/StructureDefinition/org",
        ],
    )


async def test_date_prefixes_bare_ids_missing_and_string_modifiers(harness: Harness) -> None:
    await add(
        harness,
        {
            "resourceType": "DiagnosticReport",
            "id": "dr-prelim",
            "meta": meta(),
            "status": "preliminary",
            "code": {"text": "x"},
        },
    )
    snapshot = await harness.runtime.resources.current_seq()
    before = await stored(harness, snapshot)
    pid = first_patient(before["Patient"])
    encounter = before["MedicationRequest"][0]["encounter"]["reference"]
    await export_and_compare(
        harness,
        {
            "Observation": lambda r: (
                "2024-06-16" <= r["effectiveDateTime"] < "2025-01-01" and r["status"] == "final"
            ),
            "Condition": lambda r: not r["onsetDateTime"].startswith("2023"),
            "Encounter": lambda r: r["period"]["end"] > "2025-06-01T12:00:00Z",
            "Procedure": lambda r: r["performedPeriod"]["start"] < "2022-02",
            "MedicationRequest": lambda r: r["encounter"]["reference"] == encounter,
            "Immunization": lambda r: r["patient"]["reference"] == f"Patient/{pid}",
            "DiagnosticReport": lambda r: r["status"] == "final",
            "Patient": lambda r: r["birthDate"] < "1961",
            "Practitioner": lambda r: r["name"][0]["family"] == "Smith",
            "Organization": lambda r: "ossi" in r["name"].lower(),
        },
        _type=[
            "Observation,Condition,Encounter,Procedure,MedicationRequest,Immunization",
            "DiagnosticReport,Patient,Practitioner,Organization",
        ],
        _typeFilter=[
            "Observation?date=sa2024-06-15&date=eb2025-01&subject:missing=false&status=final",
            "Condition?onset-date=ne2023",
            "Encounter?date=gt2025-06-01T12:00:00Z",
            "Procedure?date=lt2022-02",
            f"MedicationRequest?encounter={encounter}",
            f"Immunization?patient={pid}",
            "DiagnosticReport?status=|final",
            "Patient?birthdate=le1960",
            "Practitioner?family:exact=Smith",
            "Organization?name:contains=OSSI",
        ],
    )


async def test_elements_subset_each_type_and_tag_it(harness: Harness) -> None:
    before = await stored(harness, await harness.runtime.resources.current_seq())
    everything, output = await export_and_compare(
        harness,
        {
            "Patient": lambda r: True,
            "Observation": lambda r: ("http://loinc.org", "8867-4") in codings(r["code"]),
            "Encounter": lambda r: True,
            "Group": lambda r: True,
        },
        _type=["Patient,Observation,Encounter,Group"],
        _typeFilter=["Observation?code=http://loinc.org|8867-4"],
        _elements=["Patient.name,Patient.birthDate,code,status", "effective"],
    )
    kept = {
        "Patient": ("name", "birthDate", "code", "status", "effective"),
        "Observation": ("code", "status", "effectiveDateTime"),
        "Encounter": ("status",),
        "Group": (),
    }
    for type_, fields in kept.items():
        stored_by_id = {r["id"]: r for r in everything[type_]}
        assert output[type_], type_
        for resource in output[type_]:
            original = stored_by_id[resource["id"]]
            want = {"resourceType": type_, "id": original["id"]}
            want |= {k: original[k] for k in fields if k in original}
            want["meta"] = {**original["meta"], "tag": [SUBSETTED]}
            assert resource == want
    assert len(before["Group"]) == len(output["Group"]) == 3


async def test_a_filtered_type_outside_type_is_not_exported_and_noted(harness: Harness) -> None:
    fields = request_fields(_type=["Patient"], _typeFilter=["Observation?status=final"])
    assert any("Observation" in note and "_type" in note for note in fields["ignored"])
    job = await harness.submit(**fields)
    view = await harness.run_all(job.id)
    assert {f.type for f in view.files} == {"Patient", "OperationOutcome"}
    assert (await harness.validate(job.id)).ok


async def test_indexed_parameters_are_pushed_into_the_store(harness: Harness) -> None:
    before = await stored(harness, await harness.runtime.resources.current_seq())
    ids = sorted(r["id"] for r in before["Observation"])[:3]
    recent = [r for r in before["Immunization"] if r["meta"]["lastUpdated"] >= "2025"]
    assert 0 < len(recent) < len(before["Immunization"])
    job = await harness.submit(
        **request_fields(
            _type=["Observation,Immunization"],
            _typeFilter=[f"Observation?_id={','.join(ids)}", "Immunization?_lastUpdated=ge2025"],
        )
    )
    items = {i.type: i for i in await harness.plan()}
    # The store counted only what its columns select: the planner's estimates show it.
    assert items["Observation"].total_estimate == 3
    assert items["Immunization"].total_estimate == len(recent)
    view = await harness.run_all(job.id)
    assert sum(f.count for f in view.files if f.type == "Observation") == 3
    assert (await harness.validate(job.id)).ok


async def test_pages_filtered_out_entirely_still_advance_the_checkpoint(harness: Harness) -> None:
    await add(
        harness,
        {
            "resourceType": "Observation",
            "id": "needle",
            "meta": meta(),
            "status": "final",
            "code": {"coding": [{"system": "http://example.org/codes", "code": "needle"}]},
        },
    )
    job = await harness.submit(
        **request_fields(
            _type=["Observation"], _typeFilter=["Observation?code=http://example.org/codes|"]
        )
    )
    items = await harness.plan()
    assert len(items) == 1
    item = await harness.acquire()
    assert isinstance(item, ExportItemRecord)
    # Drained while the third page is written (the fourth is read ahead).
    drained = await harness.run_draining(item, "page", 4)
    assert isinstance(drained, ExportItemRecord) and drained.status == JobStatus.QUEUED
    # Three pages read, nothing written, and the continuation point is past all of them.
    assert drained.pages_read == 3 and sum(f.count for f in drained.output) == 0
    assert drained.after_seq > items[0].after_seq and drained.resources_done == 3 * 50
    resumed = await harness.acquire()
    done = await harness.run(resumed)
    assert isinstance(done, ExportItemRecord) and done.status == JobStatus.COMPLETED
    assert [(f.type, f.count) for f in done.output] == [("Observation", 1)]
    assert (await harness.validate(job.id)).ok


async def test_group_level_filters_apply_within_the_members_compartments(
    harness: Harness,
) -> None:
    everything = await stored(harness, await harness.runtime.resources.current_seq())
    group = min(everything["Group"], key=lambda g: len(g["member"]))  # the 5-member pilot
    members = {m["entity"]["reference"] for m in group["member"]}
    fields = request_fields(
        _type=["Observation,Patient"],
        _typeFilter=["Observation?category=laboratory&date=ge2023"],
    )
    job = await harness.submit(ExportKind.GROUP, group_id=group["id"], **fields)
    await harness.run_all(job.id)
    output = await exported(harness, job.id)
    want = {
        r["id"]
        for r in everything["Observation"]
        if r["subject"]["reference"] in members
        and (CATEGORY, "laboratory") in codings(r["category"])
        and r["effectiveDateTime"] >= "2023"
    }
    assert want and {r["id"] for r in output["Observation"]} == want
    assert {f"Patient/{r['id']}" for r in output["Patient"]} == members
    report = await harness.validate(job.id)
    assert report.ok, report.render()
