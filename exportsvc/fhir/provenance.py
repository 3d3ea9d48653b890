"""Provenance and what it points at: pure helpers for ``includeAssociatedData``.

A Provenance is *associated* with the resources its ``target`` references name; a
reference counts whatever its form: ``Type/id``, ``Type/id/_history/v`` (any version
of the resource: provenance of an earlier version is still about that resource) or an
absolute URL ending in ``Type/id``. Contained (``#``) and ``urn:`` references name
nothing exportable and are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from exportsvc.fhir.compartment import RESOURCE_TYPES

__all__ = ["LATEST", "PROVENANCE_VALUES", "RELEVANT", "recency", "targets"]

LATEST: Final = "LatestProvenanceResources"
RELEVANT: Final = "RelevantProvenanceResources"
PROVENANCE_VALUES: Final = frozenset({LATEST, RELEVANT})
_EARLIEST: Final = datetime.min.replace(tzinfo=UTC)


def _key(reference: str) -> tuple[str, str] | None:
    head, _, _ = reference.partition("/_history/")
    parts = head.rsplit("/", 2)
    if len(parts) < 2 or parts[-2] not in RESOURCE_TYPES or not parts[-1]:
        return None
    return parts[-2], parts[-1]


def targets(provenance: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """The (type, id) of every resource ``target`` references."""
    found = set()
    for target in provenance.get("target") or ():
        reference = target.get("reference") if isinstance(target, dict) else None
        if isinstance(reference, str) and not reference.startswith(("#", "urn:")):
            key = _key(reference)
            if key is not None:
                found.add(key)
    return frozenset(found)


def _instant(value: Any) -> datetime:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None:
        return _EARLIEST
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def recency(provenance: Mapping[str, Any]) -> tuple[datetime, datetime, str]:
    """How recent a Provenance is: ``recorded``, then ``meta.lastUpdated``, then id
    (a total order, so "the most recent" is always exactly one)."""
    meta = provenance.get("meta") or {}
    updated = meta.get("lastUpdated") if isinstance(meta, dict) else None
    return _instant(provenance.get("recorded")), _instant(updated), str(provenance.get("id"))
