"""Kick-off parameter parsing: pure, no server."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from exportsvc.errors import InvalidRequest, NotSupported
from exportsvc.params import parameters_body, parse_export_request, parse_prefer
from exportsvc.records import ExportKind

ASYNC = "respond-async"


def parse(pairs, kind=ExportKind.SYSTEM, *, method="GET", prefer=ASYNC, accept=None, group=None):
    return parse_export_request(
        kind,
        pairs,
        method=method,
        request_url="http://x/$export",
        prefer=prefer,
        accept=accept,
        group_id=group,
    )


def test_defaults() -> None:
    request = parse([])
    assert request.kind == ExportKind.SYSTEM
    assert request.types == []
    assert request.output_format == "application/fhir+ndjson"
    assert request.since is None and request.until is None


def test_types_split_and_deduplicated() -> None:
    request = parse([("_type", "Patient,Observation"), ("_type", "Patient")])
    assert request.types == ["Patient", "Observation"]


@pytest.mark.parametrize("fmt", ["application/fhir+ndjson", "application/ndjson", "ndjson"])
def test_output_formats(fmt: str) -> None:
    assert parse([("_outputFormat", fmt)]).output_format == "application/fhir+ndjson"


def test_since_until() -> None:
    request = parse([("_since", "2024-01-01T00:00:00Z"), ("_until", "2025-01-01T00:00:00+01:00")])
    assert request.since == datetime(2024, 1, 1, tzinfo=UTC)
    assert request.until is not None and request.until.utcoffset() is not None


@pytest.mark.parametrize(
    ("pairs", "named"),
    [
        ([("_type", "Nope")], "_type 'Nope'"),
        ([("_since", "yesterday")], "_since 'yesterday'"),
        ([("_since", "2024-01-01")], "_since"),
        ([("_since", "2024-01-01T00:00:00")], "_since"),
        ([("_until", "2024-13-01T00:00:00Z")], "_until"),
        ([("_outputFormat", "text/csv")], "_outputFormat 'text/csv'"),
        ([("foo", "bar")], "unknown parameter 'foo'"),
        ([("_since", "2024-01-01T00:00:00Z"), ("_since", "2024-01-02T00:00:00Z")], "_since"),
        ([("_since", "2025-01-01T00:00:00Z"), ("_until", "2024-01-01T00:00:00Z")], "_since"),
        ([("patient", "Patient/1")], "patient"),
    ],
)
def test_bad_parameters_name_the_problem(pairs: list[tuple[str, str]], named: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(pairs)
    assert named in info.value.message
    assert info.value.status == 400


def test_unsupported_search_parameter_is_not_supported() -> None:
    with pytest.raises(NotSupported, match="value-quantity"):
        parse([("_typeFilter", "Observation?value-quantity=1")])


def test_prefer_respond_async_required() -> None:
    with pytest.raises(InvalidRequest, match="respond-async"):
        parse([], prefer=None)
    with pytest.raises(InvalidRequest, match="respond-async"):
        parse([], prefer="handling=lenient")


def test_accept_must_be_json() -> None:
    parse([], accept="application/fhir+json")
    parse([], accept="application/json, text/plain;q=0.5")
    with pytest.raises(InvalidRequest, match="Accept"):
        parse([], accept="text/html")


def test_lenient_ignores_and_reports() -> None:
    request = parse(
        [("foo", "1"), ("_typeFilter", "Patient?phone=555"), ("_type", "Patient")],
        prefer="respond-async, handling=lenient",
    )
    assert request.types == ["Patient"] and request.type_filters == []
    assert len(request.ignored) == 2
    assert "'foo'" in request.ignored[0] and "'phone'" in request.ignored[1]


def test_lenient_still_rejects_bad_values() -> None:
    with pytest.raises(InvalidRequest, match="_type"):
        parse([("_type", "Nope")], prefer="respond-async, handling=lenient")


def test_patient_level_notes_types_outside_the_compartment() -> None:
    request = parse([("_type", "Practitioner,Observation")], ExportKind.PATIENT)
    assert request.types == ["Practitioner", "Observation"]
    assert len(request.ignored) == 1 and "'Practitioner'" in request.ignored[0]
    assert parse([("_type", "Observation")], ExportKind.PATIENT).ignored == []


def test_patient_parameter_via_post() -> None:
    body = orjson.dumps(
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "patient", "valueReference": {"reference": "Patient/a"}},
                {"name": "patient", "valueReference": {"reference": "Patient/b"}},
                {"name": "_type", "valueString": "Patient,Condition"},
            ],
        }
    )
    request = parse(parameters_body(body), ExportKind.PATIENT, method="POST")
    assert request.patients == ["a", "b"]
    assert request.types == ["Patient", "Condition"]
    with pytest.raises(InvalidRequest, match="system-level"):
        parse(parameters_body(body), ExportKind.SYSTEM, method="POST")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"resourceType":"Patient"}',
        b'{"resourceType":"Parameters","parameter":[{}]}',
    ],
)
def test_bad_parameters_body(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parameters_body(body)


def test_bad_patient_reference() -> None:
    with pytest.raises(InvalidRequest, match="Patient reference"):
        parse([("patient", "Group/1")], ExportKind.PATIENT, method="POST")


def test_bad_group_id() -> None:
    with pytest.raises(InvalidRequest, match="Group id"):
        parse([], ExportKind.GROUP, group="../etc")


def test_fingerprint_ignores_order() -> None:
    a = parse([("_type", "Patient,Observation")])
    b = parse([("_type", "Observation,Patient")])
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != parse([("_type", "Patient")]).fingerprint()


def test_parse_prefer() -> None:
    assert parse_prefer("respond-async, handling=lenient") == {"respond-async", "handling=lenient"}
    assert parse_prefer(None) == set()


@pytest.mark.parametrize("name", ["abc", "exports-2026", "a1b", "x" * 63])
def test_container_names_accepted(name: str) -> None:
    assert parse([("_container", name)]).container == name


@pytest.mark.parametrize(
    "name", ["ab", "x" * 64, "Exports", "-abc", "abc-", "a--b", "a_b", "../etc", "a/b", "a b", ""]
)
def test_container_names_refused(name: str) -> None:
    with pytest.raises(InvalidRequest, match="_container"):
        parse([("_container", name)])


def test_include_associated_data_values() -> None:
    request = parse(
        [
            ("includeAssociatedData", "LatestProvenanceResources"),
            ("includeAssociatedData", "RelevantProvenanceResources,LatestProvenanceResources"),
        ]
    )
    assert request.associated == ["LatestProvenanceResources", "RelevantProvenanceResources"]
    assert parse([]).associated == []
    with pytest.raises(InvalidRequest, match="includeAssociatedData '_custom', 'Nope'"):
        parse([("includeAssociatedData", "_custom,LatestProvenanceResources,Nope")])
    lenient = parse(
        [("includeAssociatedData", "Nope,RelevantProvenanceResources")],
        prefer="respond-async, handling=lenient",
    )
    assert lenient.associated == ["RelevantProvenanceResources"]
    assert len(lenient.ignored) == 1 and "'Nope'" in lenient.ignored[0]


def test_allow_partial_manifests_and_separate_export_status() -> None:
    assert parse([("allowPartialManifests", "true")]).partial_manifests is True
    assert parse([("allowPartialManifests", "false")]).partial_manifests is False
    assert parse([]).partial_manifests is False
    with pytest.raises(InvalidRequest, match="allowPartialManifests 'yes'"):
        parse([("allowPartialManifests", "yes")])
    with pytest.raises(InvalidRequest, match="allowPartialManifests may be given only once"):
        parse([("allowPartialManifests", "true"), ("allowPartialManifests", "true")])
    assert parse([], prefer="respond-async, separate-export-status").separate_status is True
    assert parse([], prefer="respond-async").separate_status is False


def test_organize_output_by() -> None:
    assert parse([("organizeOutputBy", "Patient")]).organize_by == "Patient"
    assert parse([]).organize_by is None
    with pytest.raises(InvalidRequest, match="organizeOutputBy 'Group'"):
        parse([("organizeOutputBy", "Group")])
    both = [("organizeOutputBy", "Patient"), ("includeAssociatedData", "LatestProvenanceResources")]
    with pytest.raises(InvalidRequest, match="cannot be combined"):
        parse(both)
    lenient = parse(both, prefer="respond-async, handling=lenient")
    assert lenient.organize_by == "Patient" and lenient.associated == []
    assert "cannot be combined" in lenient.ignored[0]
