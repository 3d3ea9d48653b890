"""In-memory resource store with the same versioning model as the SQL backends."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from datastore.memory.operations import MemoryOperationDataStore
from datastore.resources import (
    MAX_TIME,
    MIN_TIME,
    BlockQuery,
    BlockRow,
    Checkpoint,
    Deletion,
    DeletionPage,
    ExportQuery,
    Origin,
    Page,
    ResourceStore,
    VersionRow,
    WriteResult,
    to_micros,
)
from datastore.versioning import new_version
from exportsvc.records import utcnow


@dataclass(slots=True)
class _Version:
    seq: int
    type: str
    id: str
    version: int
    last_updated: int
    raw: bytes | None
    patients: frozenset[str]
    next_seq: int | None = None
    origin: tuple[str, int] | None = None


class MemoryResourceStore(ResourceStore):
    """``operations``: the store whose records ``write(checkpoint=...)`` saves."""

    def __init__(self, operations: MemoryOperationDataStore | None = None) -> None:
        self._versions: list[_Version] = []
        self._current: dict[tuple[str, str], _Version] = {}
        self._operations = operations

    async def current_seq(self) -> int:
        return len(self._versions)

    def _append(self, entry: _Version) -> None:
        previous = self._current.get((entry.type, entry.id))
        if previous is not None:
            previous.next_seq = entry.seq
        self._versions.append(entry)
        self._current[(entry.type, entry.id)] = entry

    async def write(
        self,
        resources: Iterable[Mapping[str, Any]],
        *,
        keep_last_updated: bool = False,
        origin: Origin | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> WriteResult:
        result = WriteResult()
        now = utcnow()
        if checkpoint is not None and self._operations is None:
            raise RuntimeError("this store has no operation store to save checkpoints in")
        undo = copy.deepcopy((self._versions, self._current)) if checkpoint else None
        for index, resource in enumerate(resources):
            key = (str(resource.get("resourceType")), str(resource.get("id")))
            current = self._current.get(key)
            mark = (origin.job_id, origin.positions[index]) if origin else None
            same_job = current and mark and current.origin and current.origin[0] == mark[0]
            if same_job and current and current.origin and mark and current.origin[1] > mark[1]:
                result.unchanged += 1  # a later line of this import already wrote it
                continue
            previous = (current.version, current.raw) if current else None
            version = new_version(resource, previous, now, keep_last_updated=keep_last_updated)
            if version is None:
                result.unchanged += 1
                if current and mark:
                    current.origin = mark
                continue
            if current:
                result.updated += 1
            else:
                result.created += 1
            self._append(
                _Version(
                    len(self._versions) + 1,
                    version.type,
                    version.id,
                    version.version,
                    version.last_updated,
                    version.raw,
                    version.patients,
                    origin=mark,
                )
            )
            result.versions.append((version.type, version.id, version.version))
        if checkpoint is not None and self._operations is not None:
            try:
                self._operations.save_now(checkpoint(result))
            except BaseException:
                assert undo is not None
                self._versions, self._current = undo  # one transaction: nothing written
                raise
        return result

    async def delete(self, type_: str, id_: str) -> bool:
        current = self._current.get((type_, id_))
        if current is None or current.raw is None:
            return False
        stamp = to_micros(utcnow(), 0)
        seq = len(self._versions) + 1
        # A deletion keeps the compartment of the version it deletes (deleted[] filters).
        patients = current.patients
        self._append(_Version(seq, type_, id_, current.version + 1, stamp, None, patients))
        return True

    def _visible(self, v: _Version, snap: int) -> bool:
        return v.seq <= snap and (v.next_seq is None or v.next_seq > snap) and v.raw is not None

    async def read(self, type_: str, id_: str, as_of: int | None = None) -> dict[str, Any] | None:
        snap = len(self._versions) if as_of is None else as_of
        for v in self._versions:
            if v.type == type_ and v.id == id_ and self._visible(v, snap):
                assert v.raw is not None
                return dict(orjson.loads(v.raw))
        return None

    async def seq_bounds(self, type_: str, as_of: int) -> tuple[int, int] | None:
        seqs = [v.seq for v in self._versions[:as_of] if v.type == type_]
        return (min(seqs), max(seqs)) if seqs else None

    async def types(self, as_of: int) -> list[str]:
        return sorted({v.type for v in self._versions[:as_of]})

    def _matches(self, v: _Version, query: ExportQuery) -> bool:
        since, until = to_micros(query.since, MIN_TIME), to_micros(query.until, MAX_TIME)
        if v.type != query.type or not self._visible(v, query.snapshot_seq):
            return False
        if not since <= v.last_updated <= until:
            return False
        if query.ids is not None and v.id not in query.ids:
            return False
        if query.patients is not None:
            return not v.patients.isdisjoint(query.patients)
        return bool(v.patients) if query.compartment else True

    async def page(self, query: ExportQuery, after_seq: int, limit: int) -> Page:
        raws: list[bytes] = []
        next_after = after_seq
        for v in self._versions[after_seq : query.upper_seq]:
            if self._matches(v, query):
                assert v.raw is not None
                raws.append(v.raw)
                next_after = v.seq
                if len(raws) == limit:
                    break
        return Page.of(raws, next_after, len(raws) < limit)

    async def count(self, query: ExportQuery) -> int:
        return sum(1 for v in self._versions if self._matches(v, query))

    def _deleted(self, v: _Version, query: ExportQuery) -> bool:
        since, until = to_micros(query.since, MIN_TIME), to_micros(query.until, MAX_TIME)
        snap = query.snapshot_seq
        if v.type != query.type or v.raw is not None or v.seq > snap:
            return False
        if (v.next_seq is not None and v.next_seq <= snap) or not since < v.last_updated <= until:
            return False
        if query.patients is not None:
            return not v.patients.isdisjoint(query.patients)
        return bool(v.patients) if query.compartment else True

    async def deletions(self, query: ExportQuery, after_seq: int, limit: int) -> DeletionPage:
        rows: list[Deletion] = []
        for v in self._versions[after_seq:]:
            if self._deleted(v, query):
                rows.append(Deletion(v.seq, v.id, v.version, v.last_updated))
                if len(rows) == limit:
                    break
        return DeletionPage(rows, len(rows) < limit)

    async def count_deletions(self, query: ExportQuery) -> int:
        return sum(1 for v in self._versions if self._deleted(v, query))

    async def blocks(
        self, query: BlockQuery, after: tuple[str, int], limit: int
    ) -> tuple[list[BlockRow], bool]:
        since, until = to_micros(query.since, MIN_TIME), to_micros(query.until, MAX_TIME)
        found = []
        for v in self._versions:
            if not self._visible(v, query.snapshot_seq) or not since <= v.last_updated <= until:
                continue
            if query.types and v.type not in query.types:
                continue
            assert v.raw is not None
            for patient in v.patients:
                wanted = query.patients is None or patient in query.patients
                if wanted and (patient, v.seq) > after:
                    found.append(BlockRow(patient, v.seq, v.type, v.id, v.version, v.raw))
        found.sort(key=lambda r: (r.patient, r.seq))
        return found[:limit], len(found) < limit

    async def scan_versions(self, batch: int = 5000) -> AsyncIterator[VersionRow]:
        for v in list(self._versions):
            yield VersionRow(
                v.seq, v.type, v.id, v.version, v.next_seq, v.last_updated, v.raw is None, v.raw
            )
