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

Writes are set-based. :meth:`write` prepares every resource off the event loop
(:mod:`datastore.postgres.staging`: its bytes around the version number, its content hash,
its compartments), stages the batch in temporary tables (binary ``COPY`` for large
batches, one ``INSERT ... SELECT unnest`` for small ones) before it takes the lock, and
then, under the lock, one ``merge`` statement (``sql/resources.sql``) does what writing
them one by one would: it skips what a later line of the same import already wrote,
compares contents by hash with the version before (stored, or staged earlier for the same
id), numbers the changed ones, supersedes their predecessors and records the import
positions, and inserts the versions and their compartment rows. An import's checkpoint is
saved in the same transaction, fenced by its lease. No resource goes to Python and back.
An import's lines arrive as versions its preparing process already parsed, stamped with
a pending stamp and hashed (:meth:`write_versions`, ``hashes_content``), and are never
parsed here (parsing them again cost a 100k import a third of its time). First versions
of resources met once in the batch that have none yet, the whole of an initial load, go
straight into ``resources`` by binary ``COPY``, stamped and numbered here: no staging
table and no merge, which cost the server twice a ``COPY``'s time. The rest are staged
from their bytes, split around the version number, and merged after them. Which
resources exist is not looked up first while an import meets none: the unique index on
``(type, id, version)`` tells, since every resource that has versions has a version 1. A
block whose ``COPY`` meets one rolls back, and it and every later block of that import
look first, one index probe per line under the lock (:class:`_Probing`). An initial load
so saves a probe per line: a 100k import took 6 to 11% less time, alternated with the
probe in one harness.

Stamps. An export's snapshot (:meth:`snapshot`) takes its time, then reads ``max(seq)``
under the same lock: every version numbered after it must be stamped after that time, or
the next export ``_since`` it would miss the version. So a write stamps its versions with
the time it takes once it holds the lock, not when it stages them: the versions the store
stamps are staged with a pending stamp (``Stamp.pending``) at a known place in their
bytes, and the merge puts that time there and in ``last_updated``. Versions that keep
their own lastUpdated (seeding) keep it.

The cost is one writer at a time, which the SQLite backend has too; a write is one
transaction of a handful of statements whatever the batch size, so throughput comes from
batching, not from parallel writers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import orjson

from datastore.postgres.db import Connection, PostgresDatabase, queries
from datastore.postgres.operations import save_args
from datastore.postgres.staging import (
    PENDING_STAMP_AT,
    first_version_marker,
    new_marker,
    split_first_version,
    stage,
)
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
    WriteGroup,
    WriteResult,
    to_micros,
)
from datastore.versioning import NewVersion, Restamp, Stamp, content_hash, content_without_meta
from exportsvc.errors import LeaseLost
from exportsvc.records import utcnow

Q = queries("resources.sql")
OPS = queries("operations.sql")

COPY_THRESHOLD = 1000
"""From this many rows on, a write stages its resources and their compartment rows
by binary ``COPY``; smaller batches by one ``INSERT``."""


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

    hashes_content = True  # the merge compares content hashes

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
        self._probing = _Probing()

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
        # Parsing and serialising the batch is CPU work: off the event loop, and before
        # the write lock is taken.
        # Versions the store stamps are staged with a pending stamp, which the merge
        # replaces by the time taken once the write lock is held (see snapshot()).
        pending = Stamp.pending()
        positions: Sequence[int | None] = origin.positions if origin else [None] * len(batch)
        staging = await asyncio.to_thread(_stage_all, batch, pending, keep_last_updated, positions)
        return await self._merge(staging, origin, checkpoint)

    async def write_versions(
        self,
        versions: Sequence[NewVersion],
        *,
        origin: Origin | None = None,
        checkpoint: Checkpoint | None = None,
        restamp: Stamp | None = None,
        group: WriteGroup | None = None,
    ) -> WriteResult:
        """Versions an import prepared with their content hash and a pending stamp go
        straight in as rows of ``resources`` (binary ``COPY``: no staging, no merge) when
        their resource has no version yet and comes once; the others are staged from their
        bytes, unparsed, and merged. Versions prepared otherwise are staged as :meth:`write`
        stages resources. Each write commits before it returns, grouped or not."""
        if restamp is None or any(v.content_hash is None for v in versions):
            return await super().write_versions(
                versions, origin=origin, checkpoint=checkpoint, restamp=restamp, group=group
            )
        result = await self._write_prepared(versions, origin, checkpoint, restamp)
        if group is not None:
            group.on_commit()
        return result

    async def _write_prepared(
        self,
        versions: Sequence[NewVersion],
        origin: Origin | None,
        checkpoint: Checkpoint | None,
        restamp: Stamp,
    ) -> WriteResult:
        """Write the versions in one transaction: without looking up which resources
        exist while the import has met none, and again, looking first, if it meets one
        (see the module's docstring)."""
        job = origin.job_id if origin else None
        if job is not None and not self._probing.wanted(job):
            try:
                return await self._write_prepared_once(
                    versions, origin, checkpoint, restamp, probe=False
                )
            except _Exists:  # rolled back: nothing of the attempt is left
                self._probing.add(job)
        return await self._write_prepared_once(versions, origin, checkpoint, restamp, probe=True)

    async def _write_prepared_once(
        self,
        versions: Sequence[NewVersion],
        origin: Origin | None,
        checkpoint: Checkpoint | None,
        restamp: Stamp,
        *,
        probe: bool,
    ) -> WriteResult:
        positions: Sequence[int | None] = origin.positions if origin else [None] * len(versions)
        job = origin.job_id if origin else None
        async with self.db.transaction() as conn:
            await conn.execute(Q["no_jit"])
            await conn.execute(Q["lock_writes"])
            stamp = Restamp.of(restamp, utcnow())
            keys = (
                await conn.fetch(
                    Q["current_keys"], [v.type for v in versions], [v.id for v in versions]
                )
                if probe
                else []
            )
            first = int(await conn.fetchval(Q["current_seq"]))
            fresh = await asyncio.to_thread(
                _first_versions,
                versions,
                {(k[0], k[1]) for k in keys},
                stamp,
                first,
                job,
                positions,
            )
            try:
                await self._insert_first(conn, fresh)
            except asyncpg.UniqueViolationError as exc:
                if probe or exc.constraint_name != FIRST_VERSION_INDEX:
                    raise
                raise _Exists() from exc
            result = WriteResult(
                created=len(fresh.rows), versions=[(r[1], r[2], 1) for r in fresh.rows]
            )
            if fresh.later:  # existing resources, and second copies: the merge's rules
                later = [versions[i] for i in fresh.later]
                where = [positions[i] for i in fresh.later]
                staging = await asyncio.to_thread(_stage_versions, later, restamp, where)
                await conn.execute(Q["create_staging"])
                await self._stage(conn, staging)
                result.add(await self._merge_locked(conn, staging, job, stamp.new, stamp.micros))
            await _save_checkpoint(conn, checkpoint, result)
        return result

    async def _insert_first(self, conn: Connection, fresh: FirstVersions) -> None:
        await self._copy_or_insert(
            conn, "resources", fresh.rows, FIRST_VERSION_COLUMNS, Q["insert_first_versions"]
        )
        await self._copy_or_insert(
            conn, "resource_patients", fresh.patients, ("patient_id", "seq"), Q["insert_patients"]
        )

    async def _merge(
        self, staging: Staging, origin: Origin | None, checkpoint: Checkpoint | None
    ) -> WriteResult:
        """Stage the rows, then number and insert the versions under the write lock."""
        async with self.db.transaction() as conn:
            await conn.execute(Q["create_staging"])
            await self._stage(conn, staging)
            await conn.execute(Q["lock_writes"])
            stamp = Stamp.at(utcnow())
            job = origin.job_id if origin else None
            result = await self._merge_locked(
                conn, staging, job, stamp.instant.encode(), stamp.micros
            )
            await _save_checkpoint(conn, checkpoint, result)
        return result

    async def _merge_locked(
        self, conn: Connection, staging: Staging, job: str | None, instant: bytes, micros: int
    ) -> WriteResult:
        """The merge of the staged rows, under the write lock; versions staged with a
        pending stamp are stamped ``instant`` (``micros``)."""
        await self._hash_legacy(conn)
        first = int(await conn.fetchval(Q["current_seq"]))
        versions = await conn.fetch(
            Q["merge_distinct" if staging.distinct else "merge"], first, job, instant, micros
        )
        return _result(len(staging.rows), versions)

    async def _stage(self, conn: Connection, staging: Staging) -> None:
        await self._copy_or_insert(conn, "write_staging", staging.rows, None, Q["stage"])
        await self._copy_or_insert(
            conn, "write_staging_patients", staging.patients, None, Q["stage_patients"]
        )

    async def _copy_or_insert(
        self,
        conn: Connection,
        table: str,
        rows: Sequence[tuple[Any, ...]],
        columns: Sequence[str] | None,
        insert: str,
    ) -> None:
        """``rows`` into ``table`` (its ``columns``; None: all): binary ``COPY`` from
        :attr:`copy_threshold` rows on, else ``insert``, one ``INSERT ... unnest`` of a
        column array each."""
        if len(rows) >= self.copy_threshold:
            await conn.copy_records_to_table(table, records=rows, columns=columns)
        elif rows:
            await conn.execute(insert, *zip(*rows, strict=True))

    async def _hash_legacy(self, conn: Connection) -> None:
        """Hash the current versions of staged resources that have no content hash:
        written before migration 0003, or by an older process beside this one."""
        if not await conn.fetchval(Q["any_unhashed"]):
            return
        legacy = await conn.fetch(Q["unhashed"])
        if legacy:
            hashes = await asyncio.to_thread(
                lambda: [content_hash(content_without_meta(orjson.loads(r[1]))) for r in legacy]
            )
            await conn.execute(Q["set_hashes"], [r[0] for r in legacy], hashes)

    async def snapshot(self) -> tuple[int, datetime]:
        moment = utcnow()  # before the lock: a write that commits later stamps later
        async with self.db.transaction() as conn:
            await conn.execute(Q["lock_writes"])
            return int(await conn.fetchval(Q["current_seq"])), moment

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
            rows = await conn.fetch(
                Q[f"page_{variant}"], *args, after_seq, limit, *tail, query.upper_seq
            )
        # Rows, joined here: asyncpg decodes them in C without the GIL switches that made
        # SQLite join its pages in SQL, and string_agg(raw ORDER BY seq) sorted each page
        # again on the server (a 100k export: 0.66-0.68 s that way, 0.55-0.60 s so).
        last = rows[-1][0] if rows else after_seq
        return Page.of([r[1] for r in rows], last, len(rows) < limit)

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


StagedRow = tuple[int, str, str, int, bytes, bytes, bytes, int | None, int | None]
"""A ``write_staging`` row: idx, type, id, last_updated, head, tail, content_hash,
import_pos, stamp_at."""


class Staging(NamedTuple):
    """A write's rows for the staging tables, and whether it names each resource once."""

    rows: list[StagedRow]
    patients: list[tuple[int, str]]
    distinct: bool


def _stage_all(
    batch: list[Mapping[str, Any]],
    stamp: Stamp,
    keep_last_updated: bool,
    positions: Sequence[int | None],
) -> Staging:
    marker = new_marker()
    staged = [stage(r, stamp, keep_last_updated=keep_last_updated, marker=marker) for r in batch]
    rows = [
        (i, s.type, s.id, s.last_updated, s.head, s.tail, s.content_hash, positions[i], s.stamp_at)
        for i, s in enumerate(staged)
    ]
    patients = [(i, p) for i, s in enumerate(staged) for p in s.patients]
    return Staging(rows, patients, len({(s.type, s.id) for s in staged}) == len(staged))


def _stage_versions(
    versions: Sequence[NewVersion], pending: Stamp, positions: Sequence[int | None]
) -> Staging:
    """First versions stamped with ``pending`` (``first_version``, hashed) as staged rows,
    each split around its version number without parsing it: ``first_version`` ends its
    meta with that number and then the pending stamp, a random token no input holds."""
    marker = first_version_marker(pending)
    rows: list[StagedRow] = []
    patients: list[tuple[int, str]] = []
    for i, v in enumerate(versions):
        assert v.content_hash is not None  # write_versions checked
        head, tail = split_first_version(v.raw, marker)
        digest, at = v.content_hash, PENDING_STAMP_AT
        rows.append((i, v.type, v.id, v.last_updated, head, tail, digest, positions[i], at))
        patients += [(i, p) for p in v.patients]
    return Staging(rows, patients, len({(v.type, v.id) for v in versions}) == len(versions))


FIRST_VERSION_INDEX = "resources_version"
"""The unique index on ``(type, id, version)``: a first version that breaks it belongs to
a resource that has versions already (each has a version 1)."""


class _Exists(Exception):
    """A write that looked nothing up first met a resource that exists."""


class _Probing:
    """The imports (by job id) whose writes look up which resources exist first: those
    that met one. Bounded: an import forgotten here meets its next one once more."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._jobs: dict[str, None] = {}

    def wanted(self, job: str) -> bool:
        return job in self._jobs

    def add(self, job: str) -> None:
        self._jobs[job] = None
        while len(self._jobs) > self.LIMIT:
            del self._jobs[next(iter(self._jobs))]  # the oldest


FIRST_VERSION_COLUMNS = (
    "seq",
    "type",
    "id",
    "version",
    "last_updated",
    "deleted",
    "raw",
    "import_job",
    "import_pos",
    "content_hash",
)
FirstVersionRow = tuple[int, str, str, int, int, bool, bytes, str | None, int | None, bytes]
"""A row of ``resources`` (:data:`FIRST_VERSION_COLUMNS`) for a first version."""


class FirstVersions(NamedTuple):
    """What a write stores straight in, and the indexes of the versions it merges."""

    rows: list[FirstVersionRow]
    patients: list[tuple[str, int]]
    later: list[int]


def _first_versions(
    versions: Sequence[NewVersion],
    existing: set[tuple[str, str]],
    stamp: Restamp,
    seq: int,
    job: str | None,
    positions: Sequence[int | None],
) -> FirstVersions:
    """The rows of the versions whose resource has none yet (``existing`` the ones that
    have), numbered from ``seq`` + 1 and stamped; a resource's second copy in the batch,
    like one that exists, is left to the merge (``later``), which numbers after these."""
    fresh = FirstVersions([], [], [])
    rows, patients = fresh.rows, fresh.patients
    for index, v in enumerate(versions):
        key = (v.type, v.id)
        if key in existing or v.version != 1:
            fresh.later.append(index)
            continue
        existing.add(key)
        seq += 1
        assert v.content_hash is not None  # write_versions checked
        raw = stamp.raw(v.raw)
        rows.append(
            (seq, v.type, v.id, 1, stamp.micros, False, raw, job, positions[index], v.content_hash)
        )
        for patient in v.patients:
            patients.append((patient, seq))
    return fresh


async def _save_checkpoint(
    conn: Connection, checkpoint: Checkpoint | None, result: WriteResult
) -> None:
    """Save a task's record in the write's transaction, fenced by its lease version."""
    if checkpoint is not None:
        saved = await conn.fetchval(OPS["save"], *save_args(checkpoint(result)))
        if saved is None:
            raise LeaseLost()  # rolls the whole write back


def _result(staged: int, versions: list[Any]) -> WriteResult:
    """The merge's new versions (type, id, version, created) as a write's result."""
    created = sum(1 for v in versions if v[3])
    return WriteResult(
        created=created,
        updated=len(versions) - created,
        unchanged=staged - len(versions),
        versions=[(str(v[0]), str(v[1]), int(v[2])) for v in versions],
    )
