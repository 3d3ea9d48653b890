"""``_elements``: only the listed root elements, the mandatory ones, and a SUBSETTED tag.

``Type.element`` entries restrict resources of that type only; bare ``element`` entries
apply to every type. A type that no entry names (no ``Type.x`` and no bare entry) is
exported whole. Mandatory elements are ``resourceType``, ``id`` and ``meta`` (this server
does not add the other elements of minimum cardinality 1: the SUBSETTED tag says the
resource is incomplete). A choice element listed as ``value`` keeps ``valueQuantity``,
``valueString``... .
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from exportsvc.fhir.fhirpath import CHOICE_TYPES

__all__ = ["MANDATORY", "SUBSETTED", "elements_for", "subset"]

MANDATORY = ("resourceType", "id", "meta")
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}


def elements_for(elements: Sequence[str], type_: str) -> frozenset[str] | None:
    """The root elements to keep for ``type_``, or None to keep the whole resource."""
    bare = {e for e in elements if "." not in e}
    own = {e.split(".", 1)[1] for e in elements if e.startswith(type_ + ".")}
    return frozenset(bare | own) if bare or own else None


def _kept(key: str, keep: frozenset[str]) -> bool:
    if key in keep or key in MANDATORY:
        return True
    plain = key.removeprefix("_")  # a primitive's extensions follow the primitive
    if plain in keep:
        return True
    # a choice element: value → valueQuantity
    return any(plain.startswith(n) and plain[len(n) :] in CHOICE_TYPES for n in keep)


def subset(resource: Mapping[str, Any], keep: frozenset[str]) -> dict[str, Any]:
    """``resource`` with only ``keep`` and the mandatory elements, tagged SUBSETTED."""
    out = {k: v for k, v in resource.items() if _kept(k, keep)}
    meta = dict(out.get("meta") or {})
    tags = list(meta.get("tag") or [])
    if not any(
        isinstance(t, Mapping)
        and t.get("system") == SUBSETTED["system"]
        and t.get("code") == SUBSETTED["code"]
        for t in tags
    ):
        tags.append(dict(SUBSETTED))
    meta["tag"] = tags
    out["meta"] = meta
    return out
