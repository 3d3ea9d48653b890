"""PostgreSQL resource store: see ``datastore.resources`` for the versioning model.

Sequence numbers and snapshots. An export fixes ``snapshot = current_seq()`` (the largest
committed ``seq``) at kick-off and then reads ``seq <= snapshot``. That is exact only if
no version with a smaller ``seq`` can commit after a larger one: otherwise a writer that
drew 41 but commits late would be missing from a snapshot taken at 42, and every later
page of the export too. A PostgreSQL sequence hands numbers out at ``nextval`` time, not
in commit order, so concurrent writers could do exactly that.

Therefore every writing transaction (:meth:`write`, :meth:`delete`) first takes one
transaction-scoped advisory lock, ``pg_advisory_xact_lock(1163416406, 2)``, and only then
reads ``max(seq)`` and numbers its versions from there, as the SQLite backend does under its
write lock. PostgreSQL makes a transaction's commit visible before it releases its locks,
and under READ COMMITTED every statement takes a new snapshot, so the next writer's
``max(seq)`` (read after it got the lock) sees the previous writer's rows: numbers are
dense, never reused, and commit in the order they were drawn. A reader's ``max(seq)`` = S
therefore implies that every ``seq <= S`` has committed, and the rows ``seq <= S`` never
change again except for ``next_seq``, which a later writer only sets to a number above S
(in the same transaction that inserts that successor). ``seq <= S AND (next_seq IS NULL
OR next_seq > S)`` is thus stable for the whole export. Readers take no lock.

The cost is one writer at a time, which the SQLite backend has too; a write is one
transaction of a handful of statements whatever the batch size (bulk lookups by
``id = ANY($2)``, one ``UPDATE ... FROM unnest(...)`` for the superseded versions, binary
``COPY`` of large batches), so throughput comes from batching, not from parallel writers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from datastore.postgres.db import Connection, PostgresDatabase, queries
from datastore.postgres.operations import save_args
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
from exportsvc.errors import LeaseLost
from exportsvc.records import utcnow

Q = queries("resources.sql")
OPS = queries("operations.sql")

COPY_THRESHOLD = 1000
"""From this many rows on, versions and compartment rows go in by binary ``COPY``."""

_VERSION_COLUMNS = (
    "seq",
    "type",
    "id",
    "version",
    "last_updated",
    "deleted",
    "raw",
    "next_seq",
    "import_job",
    "import_pos",
)


def _filter_args(query: ExportQuery) -> tuple[str, list[Any], list[Any]]:
    """The query variant, its leading arguments, and its trailing ones (the patients,
    then the ids)."""
    args = [
        query.type,
        query.snapshot_seq,
        to_micros(query.since, MIN_TIME),
        to_micros(query.until, MAX_TIME),
    ]
    ids = None if query.ids is None else list(query.ids)
    if query.patients is not None:
        return "patients", args, [list(query.patients), ids]
    return ("compartment" if query.compartment else "all"), args, [ids]


class PostgresResourceStore(ResourceStore):
    """Versioned resources in PostgreSQL.

    ``database`` is a :class:`PostgresDatabase`, which both stores of a process should
    share (an import writes resources and its checkpoint in one transaction), or a DSN:
    the store then has a pool of its own (``min_size``..``max_size`` connections; with
    ``migrate`` it brings the schema up to date when it opens).
    """

    def __init__(
        self,
        database: PostgresDatabase | str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        migrate: bool = False,
        copy_threshold: int = COPY_THRESHOLD,
    ) -> None:
        self.db = (
            PostgresDatabase(database, min_size=min_size, max_size=max_size, migrate=migrate)
            if isinstance(database, str)
            else database
        )
        self.copy_threshold = copy_threshold

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def current_seq(self) -> int:
        async with self.db.connection() as conn:
            return int(await conn.fetchval(Q["current_seq"]))

    async def write(
        self,
        resources: Iterable[Mapping[str, Any]],
        *,
        keep_last_updated: bool = False,
        origin: Origin | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> WriteResult:
        batch = list(resources)
        if not batch and checkpoint is None:
            return WriteResult()
        now = utcnow()
        wanted: dict[str, set[str]] = {}
        for resource in batch:
            wanted.setdefault(str(resource.get("resourceType")), set()).add(str(resource.get("id")))
        async with self.db.transaction() as conn:
            await conn.execute(Q["lock_writes"])
            current: dict[tuple[str, str], list[Any]] = {}
            for type_, ids in wanted.items():
                for id_, *found in await conn.fetch(Q["current_versions"], type_, list(ids)):
                    current[(type_, id_)] = found  # seq, version, raw, import_job, import_pos
            first = int(await conn.fetchval(Q["current_seq"]))
            # Parsing and serialising the batch is CPU work: off the event loop.
            plan = await asyncio.to_thread(
                _plan, batch, current, first, now, keep_last_updated, origin
            )
            if plan.superseded:
                seqs, successors = zip(*plan.superseded, strict=True)
                await conn.execute(Q["supersede_many"], seqs, successors)
            if plan.moved:
                jobs, positions = zip(*plan.moved.values(), strict=True)
                await conn.execute(Q["set_import_pos"], jobs, positions, list(plan.moved))
            await self._insert(conn, plan)
            if checkpoint is not None:
                saved = await conn.fetchval(OPS["save"], *save_args(checkpoint(plan.result)))
                if saved is None:
                    raise LeaseLost()  # rolls the whole write back
        return plan.result

    async def _insert(self, conn: Connection, plan: _Plan) -> None:
        if len(plan.rows) >= self.copy_threshold:
            await conn.copy_records_to_table(
                "resources", records=plan.rows, columns=_VERSION_COLUMNS
            )
        elif plan.rows:
            await conn.execute(Q["insert_versions"], *zip(*plan.rows, strict=True))
        if len(plan.patients) >= self.copy_threshold:
            await conn.copy_records_to_table(
                "resource_patients", records=plan.patients, columns=("patient_id", "seq")
            )
        elif plan.patients:
            await conn.execute(Q["insert_patients"], *zip(*plan.patients, strict=True))

    async def delete(self, type_: str, id_: str) -> bool:
        async with self.db.transaction() as conn:
            await conn.execute(Q["lock_writes"])
            current = await conn.fetchrow(Q["current_version"], type_, id_)
            if current is None or current["deleted"]:
                return False
            seq = int(await conn.fetchval(Q["current_seq"])) + 1
            await conn.execute(Q["supersede"], current["seq"], seq)
            stamp = to_micros(utcnow(), 0)
            await conn.execute(
                Q["insert_version"],
                seq,
                type_,
                id_,
                current["version"] + 1,
                stamp,
                True,
                None,
                None,
            )
            return True

    async def read(self, type_: str, id_: str, as_of: int | None = None) -> dict[str, Any] | None:
        async with self.db.connection() as conn:
            if as_of is None:
                raw = await conn.fetchval(Q["read_current"], type_, id_)
            else:
                raw = await conn.fetchval(Q["read_as_of"], type_, id_, as_of)
        if raw is None:
            return None
        found: dict[str, Any] = orjson.loads(raw)
        return found

    async def seq_bounds(self, type_: str, as_of: int) -> tuple[int, int] | None:
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q["seq_bounds"], type_, as_of)
        return (int(row[0]), int(row[1])) if row and row[0] is not None else None

    async def types(self, as_of: int) -> list[str]:
        async with self.db.connection() as conn:
            return [str(r[0]) for r in await conn.fetch(Q["types"], as_of)]

    async def page(self, query: ExportQuery, after_seq: int, limit: int) -> Page:
        variant, args, tail = _filter_args(query)
        async with self.db.connection() as conn:
            records = await conn.fetch(
                Q[f"page_{variant}"], *args, after_seq, limit, *tail, query.upper_seq
            )
        return Page(
            raws=[r[1] for r in records],
            next_after=records[-1][0] if records else after_seq,
            last=len(records) < limit,
        )

    async def count(self, query: ExportQuery) -> int:
        variant, args, tail = _filter_args(query)
        async with self.db.connection() as conn:
            return int(await conn.fetchval(Q[f"count_{variant}"], *args, *tail))

    async def deletions(self, query: ExportQuery, after_seq: int, limit: int) -> DeletionPage:
        variant, args, tail = _filter_args(query)
        tail = tail[:-1]  # deletions have no content for a _typeFilter's ids
        async with self.db.connection() as conn:
            records = await conn.fetch(Q[f"deletions_{variant}"], *args, after_seq, limit, *tail)
        rows = [Deletion(r[0], r[1], r[2], r[3]) for r in records]
        return DeletionPage(rows, last=len(rows) < limit)

    async def count_deletions(self, query: ExportQuery) -> int:
        variant, args, tail = _filter_args(query)
        tail = tail[:-1]  # as in deletions()
        sql = f"SELECT count(*) FROM ({Q[f'deletions_{variant}'].rstrip(';')}) AS d"
        async with self.db.connection() as conn:  # LIMIT NULL is no limit
            return int(await conn.fetchval(sql, *args, 0, None, *tail))

    async def blocks(
        self, query: BlockQuery, after: tuple[str, int], limit: int
    ) -> tuple[list[BlockRow], bool]:
        args = [
            query.snapshot_seq,
            to_micros(query.since, MIN_TIME),
            to_micros(query.until, MAX_TIME),
            list(query.types) or None,
            after[0],
            after[1],
            limit,
        ]
        sql = Q["blocks_all"]
        if query.patients is not None:
            args.append(list(query.patients))
            sql = Q["blocks_patients"]
        async with self.db.connection() as conn:
            records = await conn.fetch(sql, *args)
        rows = [BlockRow(r[0], r[1], r[2], r[3], r[4], r[5]) for r in records]
        return rows, len(rows) < limit

    async def scan_versions(self, batch: int = 5000) -> AsyncIterator[VersionRow]:
        after = 0
        while True:
            async with self.db.connection() as conn:
                records = await conn.fetch(Q["scan_versions"], after, batch)
            for r in records:
                yield VersionRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
            if len(records) < batch:
                return
            after = records[-1][0]


@dataclass(slots=True)
class _Plan:
    result: WriteResult = field(default_factory=WriteResult)
    rows: list[list[Any]] = field(default_factory=list)
    """New versions: seq, type, id, version, last_updated, deleted, raw, next_seq."""
    superseded: list[tuple[int, int]] = field(default_factory=list)
    """(seq of a stored version, seq of its successor)."""
    patients: list[tuple[str, int]] = field(default_factory=list)
    moved: dict[int, tuple[str, int]] = field(default_factory=dict)
    """Stored versions an import confirmed unchanged: seq -> (import_job, import_pos)."""


def _plan(
    batch: list[Mapping[str, Any]],
    current: dict[tuple[str, str], list[Any]],
    first: int,
    now: datetime,
    keep_last_updated: bool,
    origin: Origin | None,
) -> _Plan:
    """Number the new versions of ``batch`` from ``first + 1`` (pure: no I/O).

    ``current`` maps each stored resource to ``[seq, version, raw, import_job,
    import_pos]`` of its current version; it is updated as the batch goes.
    """
    plan = _Plan()
    seq = first
    for index, resource in enumerate(batch):
        key = (str(resource.get("resourceType")), str(resource.get("id")))
        previous = current.get(key)
        job, pos = (origin.job_id, origin.positions[index]) if origin else (None, None)
        if previous and origin and previous[3] == job and previous[4] > pos:
            plan.result.unchanged += 1  # a later line of this import already wrote it
            continue
        version = new_version(
            resource,
            (previous[1], previous[2]) if previous else None,
            now,
            keep_last_updated=keep_last_updated,
        )
        if version is None:
            plan.result.unchanged += 1
            if previous and origin:
                previous[3:5] = [job, pos]
                if previous[0] <= first:
                    plan.moved[previous[0]] = (str(job), int(pos or 0))
                else:
                    plan.rows[previous[0] - first - 1][8:10] = [job, pos]
            continue
        seq += 1
        if previous and previous[0] > first:  # written earlier in this same batch
            plan.rows[previous[0] - first - 1][7] = seq
        elif previous:
            plan.superseded.append((previous[0], seq))
        plan.result.updated += bool(previous)
        plan.result.created += not previous
        plan.rows.append(
            [seq, *key, version.version, version.last_updated, False, version.raw, None, job, pos]
        )
        plan.patients.extend((p, seq) for p in version.patients)
        current[key] = [seq, version.version, version.raw, job, pos]
        plan.result.versions.append((version.type, version.id, version.version))
    return plan
