"""``includeAssociatedData``: the Provenance an export adds to the resources it returns.

Semantics (the spec leaves them open; README "The manifest"):

- A Provenance is associated with a resource when one of its ``target`` references names
  it (``exportsvc.fhir.provenance.targets``; any version, any reference form).
- ``RelevantProvenanceResources``: every Provenance, current at the snapshot, associated
  with at least one resource in the export's output.
- ``LatestProvenanceResources``: for each resource in the output, its most recent
  associated Provenance (``recorded``, then ``meta.lastUpdated``, then id); each once.
  Both given: Relevant, the larger set (the spec's "least restrictive value").
- With either, the export's Provenance are exactly these: Provenance is not also exported
  as a type of its own (the spec: "other Provenance resources will not be returned"), and
  ``_since``/``_until`` select the resources, not their Provenance.

Whether a target is in the output is decided by reading its version at the snapshot and
applying the request (type, ``_since``/``_until``, compartment). Latest needs the most
recent Provenance of every target first: one read-only pass over the Provenance before the
item writes anything, redone on resume (it depends on the snapshot only), holding one small
entry per target in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from datastore.resources import MAX_TIME, MIN_TIME, ExportQuery, ResourceStore, to_micros
from datastore.versioning import parse_instant
from exportsvc.fhir.compartment import PATIENT_COMPARTMENT, patient_ids
from exportsvc.fhir.provenance import RELEVANT, recency, targets
from exportsvc.records import ExportKind, ExportRequest
from exportsvc.search.matcher import compile_filters

Key = tuple[str, str]


class AssociatedProvenance:
    """Picks, page by page, the Provenance rows an export includes.

    ``scope`` is the export's query for any type: its ``compartment`` and ``patients``
    are the request's Patient scope."""

    def __init__(self, resources: ResourceStore, request: ExportRequest, scope: ExportQuery):
        self.resources = resources
        self.request = request
        self.scope = scope
        self.latest: dict[Key, tuple[tuple[datetime, datetime, str], str]] | None = None
        self._since = to_micros(request.since, MIN_TIME)
        self._until = to_micros(request.until, MAX_TIME)
        self._filters = compile_filters(request.type_filters)

    @property
    def query(self) -> ExportQuery:
        """Every Provenance current at the snapshot, whatever its own time or scope."""
        return ExportQuery("Provenance", self.scope.snapshot_seq)

    async def prepare(self, page_size: int) -> None:
        """Latest: find the most recent Provenance of every target (read-only pass)."""
        if RELEVANT in self.request.associated or self.latest is not None:
            return
        latest: dict[Key, tuple[tuple[datetime, datetime, str], str]] = {}
        after = 0
        while True:
            page = await self.resources.page(self.query, after, page_size)
            for raw in page.raws:
                resource = orjson.loads(raw)
                rank = recency(resource)
                for key in targets(resource):
                    best = latest.get(key)
                    if best is None or rank > best[0]:
                        latest[key] = (rank, resource["id"])
            after = page.next_after
            if page.last:
                break
        self.latest = latest

    async def select(self, raws: Sequence[bytes]) -> list[bytes]:
        """The Provenance (stored bytes) the export includes."""
        exported: dict[Key, bool] = {}  # per page: a Patient's Provenance share targets
        chosen = []
        for raw in raws:
            resource = orjson.loads(raw)
            candidates = targets(resource)
            if self.latest is not None:
                latest = self.latest
                candidates = frozenset(
                    k for k in candidates if k in latest and latest[k][1] == resource["id"]
                )
            for key in candidates:
                if key not in exported:
                    exported[key] = await self._exported(key)
                if exported[key]:
                    chosen.append(raw)
                    break
        return chosen

    async def _exported(self, key: Key) -> bool:
        type_, id_ = key
        request = self.request
        if type_ == "Provenance" or (request.types and type_ not in request.types):
            return False
        if request.kind != ExportKind.SYSTEM and type_ not in PATIENT_COMPARTMENT:
            return False
        resource = await self.resources.read(type_, id_, self.scope.snapshot_seq)
        return resource is not None and self._selects(type_, resource)

    def _selects(self, type_: str, resource: dict[str, Any]) -> bool:
        matcher = self._filters.get(type_)
        if matcher is not None and not matcher.matches(resource):
            return False  # the export leaves it out by its _typeFilter
        updated = (resource.get("meta") or {}).get("lastUpdated")
        stamp = to_micros(parse_instant(updated), 0) if isinstance(updated, str) else 0
        if not self._since <= stamp <= self._until:
            return False
        if not self.scope.compartment:
            return True
        patients = patient_ids(resource)
        if self.scope.patients is None:
            return bool(patients)
        return not patients.isdisjoint(self.scope.patients)
