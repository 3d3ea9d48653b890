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
from exportsvc.records import ExportKind, ExportRequest

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}\Z")  # \Z: "$" would let a final "\n" in
# Azure container names: 3-63 of a-z 0-9 -, starting and ending with a letter or digit,
# no two hyphens in a row.
CONTAINER = re.compile(r"^(?=.{3,63}\Z)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]\Z")
OUTPUT_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}
ACCEPTABLE = {"application/fhir+json", "application/json", "application/json+fhir", "*/*"}
# Bulk Data parameters we know but do not implement yet (see the README).
UNSUPPORTED = {
    "_typeFilter",
    "_elements",
    "includeAssociatedData",
    "organizeOutputBy",
    "allowPartialManifests",
}
SINGLE = {"_outputFormat", "_since", "_until", "_container"}
KNOWN = {"_outputFormat", "_type", "_since", "_until", "patient", "_container"}


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
    return ExportRequest(
        kind=kind,
        group_id=group_id,
        types=_types(values.get("_type", []), kind, ignored),
        since=since,
        until=until,
        patients=_patients(values.get("patient", []), kind, method),
        output_format="application/fhir+ndjson",
        container=container,
        request_url=request_url,
        ignored=ignored,
    )
