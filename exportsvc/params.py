"""Kick-off parameter parsing: pure functions from what the client sent to an ExportRequest.

Every problem raises an error naming the parameter; with ``Prefer: handling=lenient``,
unknown and unsupported parameters are ignored instead and listed in
``ExportRequest.ignored`` (the job reports them in its error file).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson

from exportsvc.errors import InvalidRequest, NotSupported
from exportsvc.fhir.compartment import PATIENT_COMPARTMENT, RESOURCE_TYPES
from exportsvc.fhir.provenance import PROVENANCE_VALUES
from exportsvc.records import ExportKind, ExportRequest
from exportsvc.search.matcher import FilterError
from exportsvc.search.model import TypeFilter
from exportsvc.search.parse import (
    ElementsError,
    parse_elements,
    parse_type_filter,
    split_type_filters,
)

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}\Z")  # \Z: "$" would let a final "\n" in
# Azure container names: 3-63 of a-z 0-9 -, starting and ending with a letter or digit,
# no two hyphens in a row.
CONTAINER = re.compile(r"^(?=.{3,63}\Z)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]\Z")
OUTPUT_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}
ACCEPTABLE = {"application/fhir+json", "application/json", "application/json+fhir", "*/*"}
# Bulk Data parameters we know but do not implement (none today; see the README).
UNSUPPORTED: frozenset[str] = frozenset()
SINGLE = {
    "_outputFormat",
    "_since",
    "_until",
    "_container",
    "allowPartialManifests",
    "organizeOutputBy",
}
KNOWN = {
    "_outputFormat",
    "_type",
    "_since",
    "_until",
    "patient",
    "_container",
    "_typeFilter",
    "_elements",
    "includeAssociatedData",
    "allowPartialManifests",
    "organizeOutputBy",
}
BOOLEANS = {"true": True, "false": False}


def parse_prefer(header: str | None) -> set[str]:
    """``Prefer: respond-async, handling=lenient`` → {"respond-async", "handling=lenient"}."""
    return {p.strip().lower().replace(" ", "") for p in (header or "").split(",") if p.strip()}


def check_accept(header: str | None) -> None:
    if not header:
        return
    types = {part.split(";")[0].strip().lower() for part in header.split(",")}
    if not types & ACCEPTABLE:
        raise InvalidRequest(f"Accept: {header!r} is not supported; use application/fhir+json")


def parse_instant(name: str, value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or "T" not in value or moment.tzinfo is None:
        raise InvalidRequest(
            f"{name} {value!r} is not a FHIR instant (for example 2024-01-31T00:00:00Z)"
        )
    return moment


def parameters_body(body: bytes) -> list[tuple[str, str]]:
    """A FHIR ``Parameters`` resource as (name, value) pairs, the way GET sends them."""
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("resourceType") != "Parameters":
        raise InvalidRequest("the request body must be a FHIR Parameters resource")
    pairs: list[tuple[str, str]] = []
    if not isinstance(doc.get("parameter", []), list):
        raise InvalidRequest("Parameters.parameter must be a list")
    for index, param in enumerate(doc.get("parameter") or []):
        if not isinstance(param, dict) or not isinstance(param.get("name"), str):
            raise InvalidRequest(f"Parameters.parameter[{index}] has no name")
        pairs.append((param["name"], _parameter_value(param, index)))
    return pairs


def _parameter_value(param: dict[str, Any], index: int) -> str:
    values = [k for k in param if k.startswith("value")]
    if len(values) != 1:
        raise InvalidRequest(f"Parameters.parameter[{index}] ({param['name']}) needs one value[x]")
    value = param[values[0]]
    if values[0] == "valueReference":
        value = value.get("reference") if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str | int | float):
        raise InvalidRequest(f"Parameters.parameter[{index}] ({param['name']}) has a bad value")
    return str(value)


def _types(values: Sequence[str], kind: ExportKind, notes: list[str]) -> list[str]:
    """The requested types. At Patient and Group level a type outside the Patient
    compartment is accepted (clients send fixed lists) but can match nothing: noted."""
    types: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name not in RESOURCE_TYPES:
                raise InvalidRequest(f"_type {name!r} is not a FHIR R4 resource type")
            if kind != ExportKind.SYSTEM and name not in PATIENT_COMPARTMENT:
                notes.append(
                    f"_type {name!r} is not in the Patient compartment, so a {kind.value}-level "
                    "export contains none"
                )
            if name not in types:
                types.append(name)
    return types


def _associated(values: Sequence[str], lenient: bool, notes: list[str]) -> list[str]:
    """``includeAssociatedData`` (comma list, repeatable): the provenance values; any
    other value (custom ``_...`` ones included) is refused, or ignored when lenient."""
    chosen: list[str] = []
    unknown: list[str] = []
    for value in values:
        for name in (v.strip() for v in value.split(",")):
            if name in PROVENANCE_VALUES and name not in chosen:
                chosen.append(name)
            elif name not in PROVENANCE_VALUES and name not in unknown:
                unknown.append(name)
    if unknown:
        problem = (
            f"includeAssociatedData {', '.join(repr(u) for u in unknown)} is not supported; "
            f"use {' or '.join(sorted(PROVENANCE_VALUES))}"
        )
        if not lenient:
            raise InvalidRequest(problem)
        notes.append(f"{problem}; ignored (Prefer: handling=lenient)")
    return chosen


def _patients(values: Sequence[str], kind: ExportKind, method: str) -> list[str]:
    if not values:
        return []
    if kind == ExportKind.SYSTEM:
        raise InvalidRequest("patient is not allowed in a system-level export")
    if method != "POST":
        raise InvalidRequest("patient is only accepted in a POST Parameters body")
    ids = []
    for value in values:
        type_, _, id_ = value.rpartition("/")
        if type_ != "Patient" or not FHIR_ID.match(id_):
            raise InvalidRequest(f"patient {value!r} is not a Patient reference (Patient/<id>)")
        ids.append(id_)
    return ids


def _type_filters(
    values: Sequence[str], types: Sequence[str], lenient: bool, notes: list[str]
) -> list[TypeFilter]:
    """Each ``_typeFilter`` query, parsed and checked. A query the server cannot evaluate
    is refused (``400``), or with lenient handling ignored and noted. A query for a type
    that ``_type`` leaves out is kept but noted: ``_type`` already excludes that type, so
    the filter changes nothing (the Bulk Data processing model applies ``_type`` first)."""
    queries: list[TypeFilter] = []
    for text in split_type_filters(values):
        try:
            query = parse_type_filter(text)
        except FilterError as exc:
            problem = f"_typeFilter {text[:200]!r}: {exc}"
            if not lenient:
                raise (NotSupported if exc.unsupported else InvalidRequest)(problem) from exc
            notes.append(f"{problem}; it was ignored (Prefer: handling=lenient)")
            continue
        if types and query.type not in types:
            notes.append(
                f"_typeFilter {text[:200]!r} is for {query.type}, which _type does not "
                f"include: the export contains no {query.type}"
            )
        queries.append(query)
    return queries


def _elements(values: Sequence[str], lenient: bool, notes: list[str]) -> list[str]:
    try:
        return parse_elements(values)
    except ElementsError as exc:
        if not lenient:
            raise InvalidRequest(str(exc)) from exc
        notes.append(f"{exc}; _elements was ignored (Prefer: handling=lenient)")
        return []


def parse_export_request(
    kind: ExportKind,
    pairs: Iterable[tuple[str, str]],
    *,
    method: str,
    request_url: str,
    prefer: str | None,
    accept: str | None,
    group_id: str | None = None,
) -> ExportRequest:
    preferences = parse_prefer(prefer)
    if "respond-async" not in preferences:
        raise InvalidRequest("the header Prefer: respond-async is required for $export")
    check_accept(accept)
    lenient = "handling=lenient" in preferences
    if group_id is not None and not FHIR_ID.match(group_id):
        raise InvalidRequest(f"{group_id!r} is not a valid Group id")

    values: dict[str, list[str]] = {}
    ignored: list[str] = []
    for name, value in pairs:
        if name not in KNOWN:
            problem = (
                f"parameter {name!r} is not supported by this server"
                if name in UNSUPPORTED
                else f"unknown parameter {name!r}"
            )
            if not lenient:
                raise (NotSupported if name in UNSUPPORTED else InvalidRequest)(problem)
            ignored.append(f"{problem}; it was ignored (Prefer: handling=lenient)")
            continue
        values.setdefault(name, []).append(value)
    for name in SINGLE:
        if len(values.get(name, [])) > 1:
            raise InvalidRequest(f"{name} may be given only once")

    output_format = values.get("_outputFormat", ["application/fhir+ndjson"])[0]
    if output_format not in OUTPUT_FORMATS:
        raise InvalidRequest(
            f"_outputFormat {output_format!r} is not supported; use application/fhir+ndjson"
        )
    since = parse_instant("_since", values["_since"][0]) if "_since" in values else None
    until = parse_instant("_until", values["_until"][0]) if "_until" in values else None
    if since and until and since > until:
        raise InvalidRequest("_since is later than _until")
    container = values.get("_container", [None])[0]
    if container is not None and not CONTAINER.match(container):
        raise InvalidRequest(
            f"_container {container[:80]!r} is not a valid container name: 3-63 lowercase "
            "letters, digits and single hyphens, starting and ending with a letter or digit"
        )
    types = _types(values.get("_type", []), kind, ignored)
    type_filters = _type_filters(values.get("_typeFilter", []), types, lenient, ignored)
    elements = _elements(values.get("_elements", []), lenient, ignored)
    associated = _associated(values.get("includeAssociatedData", []), lenient, ignored)
    organize_by = values.get("organizeOutputBy", [None])[0]
    if organize_by is not None and organize_by != "Patient":
        raise InvalidRequest(f"organizeOutputBy {organize_by[:40]!r} is not supported; use Patient")
    if organize_by and associated:
        problem = "includeAssociatedData cannot be combined with organizeOutputBy"
        if not lenient:
            raise InvalidRequest(problem)
        ignored.append(f"{problem}; it was ignored (Prefer: handling=lenient)")
        associated = []
    if organize_by and (type_filters or elements):
        problem = "_typeFilter and _elements cannot be combined with organizeOutputBy"
        if not lenient:
            raise InvalidRequest(problem)
        ignored.append(f"{problem}; they were ignored (Prefer: handling=lenient)")
        type_filters, elements = [], []
    partial = values.get("allowPartialManifests", ["false"])[0]
    if partial not in BOOLEANS:
        raise InvalidRequest(f"allowPartialManifests {partial[:40]!r} is not true or false")
    return ExportRequest(
        kind=kind,
        group_id=group_id,
        types=types,
        since=since,
        until=until,
        patients=_patients(values.get("patient", []), kind, method),
        output_format="application/fhir+ndjson",
        container=container,
        request_url=request_url,
        ignored=ignored,
        type_filters=type_filters,
        elements=elements,
        associated=associated,
        partial_manifests=BOOLEANS[partial],
        organize_by=organize_by,
        separate_status="separate-export-status" in preferences,
    )
