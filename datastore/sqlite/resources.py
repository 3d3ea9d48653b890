"""SQLite resource store: see ``datastore.resources`` for the versioning model."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Hashable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import cache, partial
from pathlib import Path
from typing import Any

import orjson

from datastore.columns import save_params
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
from datastore.sqlite.db import (
    ROWS_PER_INSERT,
    SqliteDatabase,
    insert_full,
    insert_many,
    queries,
    transaction,
)
from datastore.versioning import NewVersion, Restamp, Stamp, key_hash, new_version
from exportsvc.errors import LeaseLost
from exportsvc.records import JobRecord, utcnow

Q = queries("resources.sql")
OPS = queries("operations.sql")
FULL_INSERT = ROWS_PER_INSERT[0]


IDS_CLAUSE = "\n  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))"


@cache
def _without_ids(name: str) -> str:
    """Query ``name`` without its ``_id`` condition. Reading no ``id`` column, a count is
    answered from the ``(type, seq, next_seq, deleted, last_updated)`` index alone."""
    sql = Q[name]
    if IDS_CLAUSE not in sql:
        raise RuntimeError(f"query {name} has no _id condition to leave out")
    return sql.replace(IDS_CLAUSE, "")


@cache
def _joined(name: str) -> str:
    """Page query ``name`` as one row: (count, last seq, the page's ndjson). SQLite joins
    the raws while it steps, with the GIL given up once for the page instead of once per
    row. The inner ORDER BY ... LIMIT decides which rows the page holds; SQLite feeds
    them to group_concat in that order (were it not to, only the order of lines inside a
    page would change: the continuation point is the page's max(seq))."""
    inner = Q[name].rstrip(";")
    return (
        f"SELECT count(*), max(seq), CAST(group_concat(raw, x'0a') || x'0a' AS BLOB) FROM ({inner})"
    )


def _filter_params(query: ExportQuery) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {
        "type": query.type,
        "snap": query.snapshot_seq,
        "last": query.upper_seq,
        "since": to_micros(query.since, MIN_TIME),
        "until": to_micros(query.until, MAX_TIME),
        "ids": None if query.ids is None else orjson.dumps(list(query.ids)).decode(),
    }
    if query.patients is not None:
        params["patients"] = orjson.dumps(list(query.patients)).decode()
        return "patients", params
    return ("compartment" if query.compartment else "all"), params


class SqliteResourceStore(ResourceStore):
    hashes_keys = True  # resources are found by key_hash

    def __init__(self, db: SqliteDatabase | Path | str) -> None:
        self.db = db if isinstance(db, SqliteDatabase) else SqliteDatabase(db)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def current_seq(self) -> int:
        return await self.db.run(lambda c: int(c.execute(Q["current_seq"]).fetchone()[0]))

    async def write(
        self,
        resources: Iterable[Mapping[str, Any]],
        *,
        keep_last_updated: bool = False,
        origin: Origin | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> WriteResult:
        batch = list(resources)
        write = partial(_write, batch, None, keep_last_updated, origin, checkpoint)
        return await self.db.run(lambda c: transaction(c, write))

    async def write_versions(
        self,
        versions: Sequence[NewVersion],
        *,
        origin: Origin | None = None,
        checkpoint: Checkpoint | None = None,
        restamp: Stamp | None = None,
        group: WriteGroup | None = None,
    ) -> WriteResult:
        write = partial(_write_versions, versions, origin, checkpoint, restamp)
        if group is not None:
            return await self.db.run_grouped(
                write, rows=len(versions), owner=group.owner, on_commit=group.on_commit
            )
        return await self.db.run(lambda c: transaction(c, write))

    async def commit_grouped(self, owner: Hashable) -> None:
        await self.db.commit_grouped(owner)

    async def snapshot(self) -> tuple[int, datetime]:
        def snapshot(conn: sqlite3.Connection) -> tuple[int, datetime]:
            moment = utcnow()  # before the lock: a write that commits later stamps later
            return int(conn.execute(Q["current_seq"]).fetchone()[0]), moment

        return await self.db.run(lambda c: transaction(c, snapshot))

    async def delete(self, type_: str, id_: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            params = {"key": key_hash(type_, id_), "type": type_, "id": id_}
            current = conn.execute(Q["current_version"], params).fetchone()
            if current is None or current[2]:
                return False
            seq = conn.execute(Q["current_seq"]).fetchone()[0] + 1
            conn.execute(Q["supersede"], {"seq": current[0], "next_seq": seq})
            stamp = to_micros(utcnow(), 0)
            row = (seq, type_, id_, current[1] + 1, stamp, 1, None, None, None, None, params["key"])
            conn.execute(Q["insert_version"], row)
            return True

        return await self.db.run(lambda c: transaction(c, delete))

    async def read(self, type_: str, id_: str, as_of: int | None = None) -> dict[str, Any] | None:
        def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
            snap = as_of if as_of is not None else conn.execute(Q["current_seq"]).fetchone()[0]
            params = {"key": key_hash(type_, id_), "type": type_, "id": id_, "as_of": snap}
            row = conn.execute(Q["read_as_of"], params)
            found = row.fetchone()
            return orjson.loads(found[0]) if found else None

        return await self.db.run(read)

    async def seq_bounds(self, type_: str, as_of: int) -> tuple[int, int] | None:
        params = {"type": type_, "as_of": as_of}
        row = await self.db.read(lambda c: c.execute(Q["seq_bounds"], params).fetchone())
        return (int(row[0]), int(row[1])) if row and row[0] is not None else None

    async def types(self, as_of: int) -> list[str]:
        return await self.db.read(lambda c: [r[0] for r in c.execute(Q["types"], {"as_of": as_of})])

    async def page(self, query: ExportQuery, after_seq: int, limit: int) -> Page:
        variant, params = _filter_params(query)
        params.update(after=after_seq, limit=limit)
        sql = _joined(f"page_{variant}")

        def page(conn: sqlite3.Connection) -> Page:
            count, last_seq, ndjson = conn.execute(sql, params).fetchone()
            return Page(ndjson or b"", count, last_seq or after_seq, count < limit)

        return await self.db.read(page)

    async def count(self, query: ExportQuery) -> int:
        variant, params = _filter_params(query)
        name = f"count_{variant}"
        sql = Q[name] if query.ids is not None else _without_ids(name)
        return await self.db.read(lambda c: int(c.execute(sql, params).fetchone()[0]))

    async def deletions(self, query: ExportQuery, after_seq: int, limit: int) -> DeletionPage:
        variant, params = _filter_params(query)
        params.update(after=after_seq, limit=limit)
        sql = Q[f"deletions_{variant}"]

        def deletions(conn: sqlite3.Connection) -> DeletionPage:
            rows = [Deletion(*r) for r in conn.execute(sql, params)]
            return DeletionPage(rows, last=len(rows) < limit)

        return await self.db.read(deletions)

    async def count_deletions(self, query: ExportQuery) -> int:
        variant, params = _filter_params(query)
        params.update(after=0, limit=-1)  # SQLite: LIMIT -1 is no limit
        sql = f"SELECT count(*) FROM ({Q[f'deletions_{variant}'].rstrip(';')})"
        return await self.db.read(lambda c: int(c.execute(sql, params).fetchone()[0]))

    async def blocks(
        self, query: BlockQuery, after: tuple[str, int], limit: int
    ) -> tuple[list[BlockRow], bool]:
        params: dict[str, Any] = {
            "snap": query.snapshot_seq,
            "since": to_micros(query.since, MIN_TIME),
            "until": to_micros(query.until, MAX_TIME),
            "types": orjson.dumps(list(query.types)).decode(),
            "any_type": not query.types,
            "after_patient": after[0],
            "after_seq": after[1],
            "limit": limit,
        }
        sql = Q["blocks_all"]
        if query.patients is not None:
            params["patients"] = orjson.dumps(list(query.patients)).decode()
            sql = Q["blocks_patients"]

        def blocks(conn: sqlite3.Connection) -> tuple[list[BlockRow], bool]:
            rows = [BlockRow(*r) for r in conn.execute(sql, params)]
            return rows, len(rows) < limit

        return await self.db.read(blocks)

    async def scan_versions(self, batch: int = 5000) -> AsyncIterator[VersionRow]:
        after = 0
        while True:
            rows = await self.db.run(partial(_scan, after=after, limit=batch))
            for row in rows:
                seq, type_, id_, version, next_seq, last_updated, deleted, raw = row
                yield VersionRow(
                    seq, type_, id_, version, next_seq, last_updated, bool(deleted), raw
                )
            if len(rows) < batch:
                return
            after = rows[-1][0]


def _scan(conn: sqlite3.Connection, *, after: int, limit: int) -> list[tuple[Any, ...]]:
    return conn.execute(Q["scan_versions"], {"after": after, "limit": limit}).fetchall()


def _write(
    batch: Sequence[Mapping[str, Any]],
    now: datetime | None,
    keep_last_updated: bool,
    origin: Origin | None,
    checkpoint: Checkpoint | None,
    conn: sqlite3.Connection,
) -> WriteResult:
    """One transaction: look up the current versions of the whole batch (one query per
    type), insert every new version with explicit sequence numbers in bulk, then save the
    checkpoint (fenced) in the same transaction. Versions are stamped ``now``, by default
    the time inside the transaction (see ``ResourceStore.snapshot``)."""
    now = now or utcnow()
    current: dict[tuple[str, str], list[Any]] = {}
    keys = [(str(r.get("resourceType")), str(r.get("id"))) for r in batch]
    hashes = [key_hash(*key) for key in keys]
    params = {"keys": orjson.dumps(sorted(set(hashes))).decode()}
    for type_, id_, *found in conn.execute(Q["current_versions"], params):
        current[(type_, id_)] = found  # seq, version, raw, import_job, import_pos
    seq = first = conn.execute(Q["current_seq"]).fetchone()[0]
    result = WriteResult()
    rows: list[list[Any]] = []
    superseded: list[tuple[int, int]] = []
    patients: list[tuple[str, int]] = []
    moved: list[tuple[str, int, int]] = []
    for index, resource in enumerate(batch):
        key = keys[index]
        previous = current.get(key)
        job, pos = (origin.job_id, origin.positions[index]) if origin else (None, None)
        if previous and origin and previous[3] == job and previous[4] > pos:
            result.unchanged += 1  # a later line of this import already wrote it
            continue
        version = new_version(
            resource,
            (previous[1], previous[2]) if previous else None,
            now,
            keep_last_updated=keep_last_updated,
        )
        if version is None:
            result.unchanged += 1
            if previous and origin:
                previous[3:5] = [job, pos]
                if previous[0] <= first:
                    moved.append((str(job), int(pos or 0), previous[0]))
                else:
                    rows[previous[0] - first - 1][8:10] = [job, pos]
            continue
        seq += 1
        if previous and previous[0] > first:  # written earlier in this same batch
            rows[previous[0] - first - 1][7] = seq
        elif previous:
            superseded.append((seq, previous[0]))
        result.updated += bool(previous)
        result.created += not previous
        row = [seq, *key, version.version, version.last_updated, 0, version.raw, None, job, pos]
        row.append(hashes[index])
        rows.append(row)
        patients.extend((p, seq) for p in version.patients)
        current[key] = [seq, version.version, version.raw, job, pos]
        result.versions.append((version.type, version.id, version.version))
    conn.executemany(Q["supersede_many"], superseded)
    insert_many(conn, Q["insert_version"], rows)
    insert_many(conn, Q["insert_patient"], patients)
    conn.executemany(Q["set_import_pos"], moved)
    if checkpoint is not None:
        _save_checkpoint(conn, checkpoint(result))
    return result


def _save_checkpoint(conn: sqlite3.Connection, record: JobRecord) -> None:
    """Save a task's record in the write's transaction, fenced by its lease version."""
    if conn.execute(OPS["save"], save_params(record)).rowcount != 1:
        raise LeaseLost()


def _write_versions(
    versions: Sequence[NewVersion],
    origin: Origin | None,
    checkpoint: Checkpoint | None,
    restamp: Stamp | None,
    conn: sqlite3.Connection,
) -> WriteResult:
    """First versions straight in, marked with their import position; the few whose
    resource exists (or comes again later in the batch) through ``_write``'s rules; then
    the checkpoint, all in the caller's one transaction. ``restamp``: the versions' pending
    stamp, replaced here by the transaction's time."""
    now = utcnow()
    stamp = Restamp.of(restamp, now) if restamp is not None else None
    hashes = [key_hash(v.type, v.id) if v.key_hash is None else v.key_hash for v in versions]
    params = {"keys": orjson.dumps(sorted(set(hashes))).decode()}
    existing = {(t, i) for t, i, *_ in conn.execute(Q["current_exists"], params)}
    seq = conn.execute(Q["current_seq"]).fetchone()[0]
    job = origin.job_id if origin else None
    positions: Sequence[int | None] = origin.positions if origin else [None] * len(versions)
    old, new, micros = (stamp.old, stamp.new, stamp.micros) if stamp else (b"", b"", 0)
    rows: list[tuple[Any, ...]] = []
    patients: list[tuple[str, int]] = []
    later: list[int] = []
    result = WriteResult()
    written = result.versions
    # Per row, the fewest Python steps: this loop runs on the writer's thread, which
    # holds the GIL for it while the next block is read and unpickled beside it.
    for index, (version, pos, hash_) in enumerate(zip(versions, positions, hashes, strict=True)):
        type_, id_, number, last_updated, raw, members = version[:6]
        key = (type_, id_)
        if number != 1 or key in existing:
            later.append(index)
            continue
        existing.add(key)  # a second copy in this batch is an update: the slow path
        seq += 1
        if stamp is not None:
            last_updated, raw = micros, raw.replace(old, new)
        rows.append((seq, type_, id_, last_updated, raw, job, pos, hash_))
        for patient in members:  # a loop, not a generator: one per row adds up
            patients.append((patient, seq))
        written.append((type_, id_, 1))
        if len(rows) >= FULL_INSERT:  # inserted as they are made: no copy of the block
            insert_full(conn, Q["insert_first_version"], rows)
            insert_full(conn, Q["insert_patient"], patients)
    result.created = len(written)
    insert_many(conn, Q["insert_first_version"], rows)
    insert_many(conn, Q["insert_patient"], patients)
    if later:
        raws = [versions[i].raw for i in later]
        resources = [orjson.loads(stamp.raw(r) if stamp else r) for r in raws]
        where = Origin(origin.job_id, [origin.positions[i] for i in later]) if origin else None
        result.add(_write(resources, now, True, where, None, conn))
    if checkpoint is not None:
        _save_checkpoint(conn, checkpoint(result))
    return result
