"""The FHIR R4 resource list and the Patient compartment helper."""

from __future__ import annotations

from typing import Any

import pytest

from exportsvc.fhir.compartment import (
    PATIENT_COMPARTMENT,
    RESOURCE_TYPES,
    patient_id_of,
    patient_ids,
)


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


# -- the data -----------------------------------------------------------------------


def test_resource_types_are_the_r4_list() -> None:
    assert len(RESOURCE_TYPES) == 146  # every concrete R4 4.0.1 type, Parameters included
    assert {"Patient", "Observation", "Group", "Parameters", "VisionPrescription"} <= (
        RESOURCE_TYPES
    )
    # R4B / R5 names must not leak in, nor the abstract bases.
    assert not {"Resource", "DomainResource", "SubscriptionTopic", "Citation"} & RESOURCE_TYPES


def test_compartment_types_are_resource_types() -> None:
    assert set(PATIENT_COMPARTMENT) <= RESOURCE_TYPES
    assert len(PATIENT_COMPARTMENT) == 66  # types R4 lists with at least one param
    assert all(PATIENT_COMPARTMENT.values())


@pytest.mark.parametrize(
    ("rtype", "paths"),
    [
        ("Patient", ("link.other",)),
        ("Observation", ("subject", "performer")),
        ("Encounter", ("subject",)),
        ("Condition", ("subject", "asserter")),
        ("Procedure", ("subject", "performer.actor")),
        ("Group", ("member.entity",)),
        ("MedicationRequest", ("subject",)),
        ("Immunization", ("patient",)),
        ("DiagnosticReport", ("subject",)),
        ("AllergyIntolerance", ("patient", "recorder", "asserter")),
        ("AuditEvent", ("agent.who", "entity.what")),
        ("Person", ("link.target",)),
        ("Provenance", ("target",)),
        ("SupplyRequest", ("deliverTo",)),
        ("EnrollmentRequest", ("candidate",)),
    ],
)
def test_compartment_paths(rtype: str, paths: tuple[str, ...]) -> None:
    assert PATIENT_COMPARTMENT[rtype] == paths


@pytest.mark.parametrize("rtype", ["Organization", "Practitioner", "Medication", "Bundle"])
def test_types_without_param_are_not_in_the_compartment(rtype: str) -> None:
    assert rtype not in PATIENT_COMPARTMENT
    assert patient_ids({"resourceType": rtype, "id": "x", "subject": ref("Patient/1")}) == set()


def test_compartment_is_read_only() -> None:
    with pytest.raises(TypeError):
        PATIENT_COMPARTMENT["Basic"] = ("subject",)  # type: ignore[index]


# -- references ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient/123", "123"),
        ("Patient/a-b.C", "a-b.C"),
        ("Patient/123/_history/4", "123"),
        ("https://fhir.example.org/r4/Patient/123", "123"),
        ("https://fhir.example.org/r4/Patient/123/_history/4", "123"),
        ("Practitioner/123", None),
        ("RelatedPerson/123", None),
        ("https://fhir.example.org/r4/Group/Patient", None),
        ("Patient", None),
        ("Patient/", None),
        ("Patient/1/2", None),
        ("Patient?identifier=x|1", None),
        ("#contained-patient", None),
        ("urn:uuid:2e1b9d3f-0000-4000-8000-000000000000", None),
        ("Patient/" + "x" * 65, None),
        ("NotPatient/1", None),
    ],
)
def test_patient_id_of(reference: str, expected: str | None) -> None:
    assert patient_id_of(reference) == expected


def test_observation_subject_and_performer() -> None:
    obs = {
        "resourceType": "Observation",
        "id": "o1",
        "subject": ref("Patient/p1"),
        "performer": [ref("Practitioner/dr"), ref("Patient/p2"), {"display": "no ref"}],
        "encounter": ref("Encounter/e1"),
    }
    assert patient_ids(obs) == {"p1", "p2"}


def test_reference_inside_list_of_backbone_elements() -> None:
    proc = {
        "resourceType": "Procedure",
        "id": "pr1",
        "subject": ref("Patient/p1"),
        "performer": [
            {"actor": ref("Practitioner/dr")},
            {"actor": ref("Patient/p3/_history/2")},
            {"function": {"text": "no actor"}},
        ],
    }
    assert patient_ids(proc) == {"p1", "p3"}


def test_lists_at_every_level() -> None:
    careplan = {
        "resourceType": "CarePlan",
        "subject": ref("Group/g"),
        "activity": [
            {"detail": {"performer": [ref("Patient/a"), ref("Organization/o")]}},
            {"reference": ref("ServiceRequest/s")},
            {"detail": {"performer": [ref("https://h/fhir/Patient/b")]}},
        ],
    }
    assert patient_ids(careplan) == {"a", "b"}


def test_absolute_and_versioned_references() -> None:
    cond = {
        "resourceType": "Condition",
        "subject": ref("https://fhir.example.org/Patient/p1/_history/7"),
        "asserter": ref("Patient/p1"),
    }
    assert patient_ids(cond) == {"p1"}


def test_non_patient_references_are_ignored() -> None:
    enc = {
        "resourceType": "Encounter",
        "subject": ref("Group/g1"),
        "participant": [{"individual": ref("Patient/not-a-compartment-path")}],
    }
    assert patient_ids(enc) == set()


def test_patient_is_in_its_own_compartment_and_its_links() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "link": [
            {"other": ref("Patient/p0"), "type": "replaces"},
            {"other": ref("RelatedPerson/r"), "type": "seealso"},
        ],
    }
    assert patient_ids(patient) == {"p1", "p0"}
    assert patient_ids({"resourceType": "Patient", "id": "p9"}) == {"p9"}


def test_group_members() -> None:
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": ref(f"Patient/p{i}")} for i in range(3)]
        + [{"entity": ref("Device/d")}],
    }
    assert patient_ids(group) == {"p0", "p1", "p2"}


@pytest.mark.parametrize(
    "resource",
    [
        {},
        {"resourceType": 3},
        {"resourceType": "NotAType"},
        {"resourceType": "Observation"},
        {"resourceType": "Observation", "subject": "Patient/1"},
        {"resourceType": "Observation", "subject": {"reference": 1}},
        {"resourceType": "Observation", "subject": [None, 1, "x"]},
        {"resourceType": "Procedure", "performer": {"actor": [ref("Organization/o")]}},
        {"resourceType": "Procedure", "performer": "oops"},
        {"resourceType": "Patient", "id": ""},
    ],
)
def test_malformed_resources_give_empty_set(resource: dict[str, Any]) -> None:
    assert patient_ids(resource) == frozenset()


def test_single_element_where_a_list_is_expected_is_still_walked() -> None:
    proc = {"resourceType": "Procedure", "performer": {"actor": ref("Patient/x")}}
    assert patient_ids(proc) == {"x"}
