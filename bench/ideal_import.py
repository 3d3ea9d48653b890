"""Ideal import loop (c): parse + validate + insert ndjson in large transactions, no jobs.

Every line is parsed (orjson) and checked as the service checks it (a JSON object, a
known resourceType, a valid id); it gets ``meta.versionId`` 1 and ``meta.lastUpdated``
now, is serialised again, and its Patient compartment is computed, because any import
must store exactly that. Rows go into a store whose schema ``exportsvc migrate`` made,
``BATCH`` rows per transaction, with sequence numbers counted here: it is an initial
load into an empty store, so nothing is looked up.

- :func:`load_sqlite`: ``executemany`` into the service's SQLite schema, with the
  service's own connection settings (WAL, ``synchronous = NORMAL``, mmap).
- :func:`load_postgres`: binary ``COPY`` (asyncpg ``copy_records_to_table``).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from datastore.versioning import key_hash  # the SQLite schema's lookup key
from exportsvc.fhir.compartment import RESOURCE_TYPES, patient_ids

BATCH = 50_000
VALID_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

SQLITE_INSERT = """
INSERT INTO resources (seq, type, id, version, last_updated, deleted, raw, key_hash)
VALUES (?, ?, ?, 1, ?, 0, ?, ?)
"""
SQLITE_PATIENT = "INSERT OR IGNORE INTO resource_patients (patient_id, seq) VALUES (?, ?)"


class Parsed:
    """One batch of parsed lines: resource rows and compartment rows."""

    __slots__ = ("nbytes", "patients", "refused", "rows")

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, str, int, bytes]] = []
        self.patients: list[tuple[str, int]] = []
        self.refused = 0
        self.nbytes = 0


def _stamp(resource: dict[str, Any], instant: str) -> bytes:
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = "1"
    meta["lastUpdated"] = instant
    resource["meta"] = meta
    return orjson.dumps(resource)


def batches(inputs: list[Path], first_seq: int = 1) -> Iterator[Parsed]:
    """Parsed batches of ``BATCH`` valid lines from the inputs, in order."""
    now = datetime.now(UTC)
    instant = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    micros = int(now.timestamp() * 1_000_000)
    seq = first_seq
    batch = Parsed()
    for path in inputs:
        with path.open("rb") as handle:
            for line in handle:
                batch.nbytes += len(line)
                if not line.strip():
                    continue
                try:
                    resource = orjson.loads(line)
                except orjson.JSONDecodeError:
                    batch.refused += 1
                    continue
                type_ = resource.get("resourceType") if isinstance(resource, dict) else None
                id_ = resource.get("id") if type_ else None
                if type_ not in RESOURCE_TYPES or not isinstance(id_, str):
                    batch.refused += 1
                    continue
                if not VALID_ID.fullmatch(id_):
                    batch.refused += 1
                    continue
                batch.rows.append((seq, type_, id_, micros, _stamp(resource, instant)))
                batch.patients.extend((p, seq) for p in patient_ids(resource))
                seq += 1
                if len(batch.rows) >= BATCH:
                    yield batch
                    batch = Parsed()
    if batch.rows or batch.nbytes:
        yield batch


def load_sqlite(inputs: list[Path], database: Path) -> tuple[int, int]:
    """Loop (c) on SQLite: (resources, input bytes)."""
    conn = sqlite3.connect(database, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA mmap_size = 268435456")
    conn.execute("PRAGMA cache_size = -65536")
    resources = nbytes = 0
    try:
        for batch in batches(inputs):
            rows = [(*row, key_hash(row[1], row[2])) for row in batch.rows]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(SQLITE_INSERT, rows)
            conn.executemany(SQLITE_PATIENT, batch.patients)
            conn.execute("COMMIT")
            resources += len(rows)
            nbytes += batch.nbytes
    finally:
        conn.close()
    return resources, nbytes


async def load_postgres(inputs: list[Path], dsn: str) -> tuple[int, int]:
    """Loop (c) on PostgreSQL with binary COPY: (resources, input bytes)."""
    conn = await asyncpg.connect(dsn)
    resources = nbytes = 0
    columns = ("seq", "type", "id", "version", "last_updated", "deleted", "raw")
    try:
        for batch in batches(inputs):
            rows = [(s, t, i, 1, m, False, raw) for s, t, i, m, raw in batch.rows]
            async with conn.transaction():
                await conn.copy_records_to_table("resources", records=rows, columns=columns)
                await conn.copy_records_to_table(
                    "resource_patients", records=batch.patients, columns=("patient_id", "seq")
                )
            resources += len(rows)
            nbytes += batch.nbytes
    finally:
        await conn.close()
    return resources, nbytes
