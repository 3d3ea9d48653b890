"""SQLite resource store: see ``datastore.resources`` for the versioning model."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from datastore.resources import (
    MAX_TIME,
    MIN_TIME,
    ExportQuery,
    Page,
    ResourceStore,
    Row,
    VersionRow,
    WriteResult,
    to_micros,
)
from datastore.sqlite.db import SqliteDatabase, queries, transaction
from datastore.versioning import new_version
from exportsvc.records import utcnow

Q = queries("resources.sql")


def _filter_params(query: ExportQuery) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {
        "type": query.type,
        "snap": query.snapshot_seq,
        "since": to_micros(query.since, MIN_TIME),
        "until": to_micros(query.until, MAX_TIME),
    }
    if query.patients is not None:
        params["patients"] = orjson.dumps(list(query.patients)).decode()
        return "patients", params
    return ("compartment" if query.compartment else "all"), params


class SqliteResourceStore(ResourceStore):
    def __init__(self, path: Path | str) -> None:
        self.db = SqliteDatabase(path)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def current_seq(self) -> int:
        return await self.db.run(lambda c: int(c.execute(Q["current_seq"]).fetchone()[0]))

    async def write(
        self, resources: Iterable[Mapping[str, Any]], *, keep_last_updated: bool = False
    ) -> WriteResult:
        batch = list(resources)
        now = utcnow()
        return await self.db.run(
            lambda c: transaction(c, partial(_write, batch, now, keep_last_updated))
        )

    async def delete(self, type_: str, id_: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            current = conn.execute(Q["current_version"], {"type": type_, "id": id_}).fetchone()
            if current is None or current[2]:
                return False
            seq = conn.execute(Q["current_seq"]).fetchone()[0] + 1
            conn.execute(Q["supersede"], {"seq": current[0], "next_seq": seq})
            row = (seq, type_, id_, current[1] + 1, to_micros(utcnow(), 0), 1, None, None)
            conn.execute(Q["insert_version"], row)
            return True

        return await self.db.run(lambda c: transaction(c, delete))

    async def read(self, type_: str, id_: str, as_of: int | None = None) -> dict[str, Any] | None:
        def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
            snap = as_of if as_of is not None else conn.execute(Q["current_seq"]).fetchone()[0]
            row = conn.execute(Q["read_as_of"], {"type": type_, "id": id_, "as_of": snap})
            found = row.fetchone()
            return orjson.loads(found[0]) if found else None

        return await self.db.run(read)

    async def types(self, as_of: int) -> list[str]:
        return await self.db.run(lambda c: [r[0] for r in c.execute(Q["types"], {"as_of": as_of})])

    async def page(self, query: ExportQuery, after_seq: int, limit: int) -> Page:
        variant, params = _filter_params(query)
        params.update(after=after_seq, limit=limit)
        sql = Q[f"page_{variant}"]

        def page(conn: sqlite3.Connection) -> Page:
            rows = [Row(*r) for r in conn.execute(sql, params)]
            return Page(
                rows=rows,
                next_after=rows[-1].seq if rows else after_seq,
                last=len(rows) < limit,
            )

        return await self.db.run(page)

    async def count(self, query: ExportQuery) -> int:
        variant, params = _filter_params(query)
        sql = Q[f"count_{variant}"]
        return await self.db.run(lambda c: int(c.execute(sql, params).fetchone()[0]))

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
    batch: list[Mapping[str, Any]],
    now: datetime,
    keep_last_updated: bool,
    conn: sqlite3.Connection,
) -> WriteResult:
    """One transaction: look up the current versions of the whole batch (one query per
    type), then insert every new version with explicit sequence numbers in bulk."""
    current: dict[tuple[str, str], tuple[int, int, bytes | None]] = {}
    wanted: dict[str, set[str]] = {}
    for resource in batch:
        wanted.setdefault(str(resource.get("resourceType")), set()).add(str(resource.get("id")))
    for type_, ids in wanted.items():
        params = {"type": type_, "ids": orjson.dumps(sorted(ids)).decode()}
        for id_, seq, version, raw in conn.execute(Q["current_versions"], params):
            current[(type_, id_)] = (seq, version, raw)
    seq = first = conn.execute(Q["current_seq"]).fetchone()[0]
    result = WriteResult()
    rows: list[list[Any]] = []
    superseded: list[tuple[int, int]] = []
    patients: list[tuple[str, int]] = []
    for resource in batch:
        key = (str(resource.get("resourceType")), str(resource.get("id")))
        previous = current.get(key)
        version = new_version(
            resource,
            (previous[1], previous[2]) if previous else None,
            now,
            keep_last_updated=keep_last_updated,
        )
        if version is None:
            result.unchanged += 1
            continue
        seq += 1
        if previous and previous[0] > first:  # written earlier in this same batch
            rows[previous[0] - first - 1][7] = seq
        elif previous:
            superseded.append((seq, previous[0]))
        result.updated += bool(previous)
        result.created += not previous
        rows.append([seq, *key, version.version, version.last_updated, 0, version.raw, None])
        patients.extend((p, seq) for p in version.patients)
        current[key] = (seq, version.version, version.raw)
        result.versions.append((version.type, version.id, version.version))
    conn.executemany(Q["supersede_many"], superseded)
    conn.executemany(Q["insert_version"], rows)
    conn.executemany(Q["insert_patient"], patients)
    return result
