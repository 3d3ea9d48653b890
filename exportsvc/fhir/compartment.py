"""FHIR R4 resource types and the Patient compartment.

``data/patient_compartment.json`` is the R4 (4.0.1) ``CompartmentDefinition/patient`` with
every search parameter translated to the element path(s) its R4 expression covers; e.g.
Procedure's ``patient`` and ``performer`` parameters become ``subject`` and
``performer.actor``, and ``where(resolve() is Patient)`` filters are dropped because
:func:`patient_ids` only keeps ``Patient/<id>`` references anyway. Types the definition
lists without a parameter (Organization, Medication, ...) are in no Patient's compartment.

:func:`patient_ids` runs on every resource written to the store, so the paths are
compiled into tuples of keys at import time and the walk is a few dict lookups.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib.resources import files
from types import MappingProxyType
from typing import Any, Final

__all__ = ["PATIENT_COMPARTMENT", "RESOURCE_TYPES", "patient_id_of", "patient_ids"]


def _load(name: str) -> Any:
    return json.loads(files(__package__ or "exportsvc.fhir").joinpath("data", name).read_text())


RESOURCE_TYPES: Final[frozenset[str]] = frozenset(_load("resource_types.json"))

PATIENT_COMPARTMENT: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {rtype: tuple(paths) for rtype, paths in _load("patient_compartment.json").items()}
)

_PATHS: Final[Mapping[str, tuple[tuple[str, ...], ...]]] = {
    rtype: tuple(tuple(path.split(".")) for path in paths)
    for rtype, paths in PATIENT_COMPARTMENT.items()
}

_VALID_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}").fullmatch
_NONE: Final[frozenset[str]] = frozenset()


def _reference_targets(resource: Mapping[str, Any], keys: tuple[str, ...]) -> list[Any]:
    """The values at ``keys`` below ``resource``, flattening lists at every level."""
    nodes: list[Any] = [resource]
    for key in keys:
        found: list[Any] = []
        for node in nodes:
            value = node.get(key) if isinstance(node, dict) else None
            if isinstance(value, list):
                found.extend(value)
            elif value is not None:
                found.append(value)
        if not found:
            return found
        nodes = found
    return nodes


_SEEN: dict[str, str | None] = {}
"""References already parsed: a Patient's resources name it again and again."""


def patient_id_of(reference: str) -> str | None:
    """The id in ``[base/]Patient/<id>[/_history/<vid>]``, or None for any other reference."""
    if reference in _SEEN:
        return _SEEN[reference]
    head, _, _ = reference.partition("/_history/")
    rtype, slash, rid = head.rpartition("/")
    is_patient = slash and (rtype == "Patient" or rtype.endswith("/Patient"))
    pid = rid if is_patient and _VALID_ID(rid) else None
    if len(_SEEN) >= 65_536:
        _SEEN.clear()
    _SEEN[reference] = pid
    return pid


def patient_ids(resource: Mapping[str, Any]) -> frozenset[str]:
    """The ids of all Patients whose compartment contains ``resource``.

    A Patient is in its own compartment and in those of the Patients its ``link.other``
    points at. Contained resources, ``urn:`` and ``#`` references are not followed.
    """
    rtype = resource.get("resourceType")
    paths = _PATHS.get(rtype) if isinstance(rtype, str) else None
    if paths is None:
        return _NONE
    ids: set[str] = set()
    if rtype == "Patient":
        own = resource.get("id")
        if isinstance(own, str) and own:
            ids.add(own)
    for keys in paths:
        if len(keys) == 1:  # fast path: "subject", "patient", ...
            value = resource.get(keys[0])
            if value is None:
                continue
            targets = value if isinstance(value, list) else (value,)
        else:
            targets = _reference_targets(resource, keys)
        for target in targets:
            ref = target.get("reference") if isinstance(target, dict) else None
            if isinstance(ref, str):
                pid = patient_id_of(ref)
                if pid is not None:
                    ids.add(pid)
    return frozenset(ids) if ids else _NONE
