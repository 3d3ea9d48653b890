"""Ideal export loops: the cost of one keyset scan plus one copy of the bytes, no jobs.

(a) :func:`scan_to_files` reads the store's raw resource bytes by keyset pages over
    ``(type, seq)`` as of a snapshot (SQLite, memory-mapped) and writes one ndjson file
    per type, fsynced at its end.
    :func:`scan_postgres_to_files` is the same loop on a PostgreSQL store (asyncpg, one
    prepared page query, planned for each type as the service plans its pages).
(b) :func:`scan_to_azure` does the same scan into one block blob per type, cut into
    8 MiB blocks; with ``overlapped`` a reader thread keeps scanning while up to
    ``uploads`` threads stage blocks (at most ``uploads + 2`` blocks in memory); without,
    it reads a block, uploads it, reads the next (the sequential baseline). With ``md5``
    each block carries its ``Content-MD5`` (the SDK's ``validate_content``), as the
    service's blocks do: Azurite 3.37 computes a CRC-64 of every block that comes
    without one, in JavaScript (about 85 MB/s here), and an MD5 where one is given
    (about 700 MB/s), so the loop without it measures mostly that CRC-64.

    .venv/bin/python bench/ideal_export.py STORE.sqlite3|postgresql://... OUT_DIR
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import asyncpg
from azure.storage.blob import BlobBlock, ContainerClient

PAGE = 5000
BLOCK = 8 << 20
MMAP = 1 << 40  # SQLite caps it at its own compile-time maximum

PAGE_SQL = """
SELECT seq, raw FROM resources
WHERE type = ? AND seq > ? AND seq <= ? AND (next_seq IS NULL OR next_seq > ?) AND deleted = 0
ORDER BY seq LIMIT ?
"""


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA mmap_size = {MMAP}")
    conn.execute("PRAGMA cache_size = -65536")
    return conn


def snapshot(conn: sqlite3.Connection) -> tuple[int, list[str]]:
    """The snapshot sequence and the types present in it."""
    snap = int(conn.execute("SELECT coalesce(max(seq), 0) FROM resources").fetchone()[0])
    types = [r[0] for r in conn.execute("SELECT DISTINCT type FROM resources ORDER BY type")]
    return snap, types


def pages(conn: sqlite3.Connection, type_: str, snap: int) -> Iterator[tuple[int, bytes]]:
    """(resources, ndjson bytes) of each keyset page of ``type_`` as of ``snap``."""
    after = 0
    while True:
        rows = conn.execute(PAGE_SQL, (type_, after, snap, snap, PAGE)).fetchall()
        if not rows:
            return
        yield len(rows), b"\n".join(r[1] for r in rows) + b"\n"
        after = rows[-1][0]
        if len(rows) < PAGE:
            return


def scan_to_files(store: Path, out: Path) -> tuple[int, int]:
    """Loop (a): (resources, bytes) written as ``out/<Type>.ndjson``."""
    out.mkdir(parents=True, exist_ok=True)
    conn = connect(store)
    resources = nbytes = 0
    try:
        snap, types = snapshot(conn)
        for type_ in types:
            with open(out / f"{type_}.ndjson", "wb") as handle:
                for count, data in pages(conn, type_, snap):
                    handle.write(data)
                    resources += count
                    nbytes += len(data)
                handle.flush()
                os.fsync(handle.fileno())
    finally:
        conn.close()
    return resources, nbytes


PG_PAGE_SQL = """
SELECT seq, raw FROM resources
WHERE type = $1 AND seq > $2 AND seq <= $3 AND (next_seq IS NULL OR next_seq > $3) AND NOT deleted
ORDER BY seq LIMIT $4
"""


async def scan_postgres_to_files(dsn: str, out: Path) -> tuple[int, int]:
    """Loop (a) on PostgreSQL: (resources, bytes) written as ``out/<Type>.ndjson``.

    Files are written with blocking calls on purpose: the loop has nothing else to do
    meanwhile, so that is its fastest form (as in :func:`scan_to_files`)."""
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    conn = await asyncpg.connect(dsn, server_settings={"plan_cache_mode": "force_custom_plan"})
    resources = nbytes = 0
    try:
        snap = int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM resources"))
        types = [r[0] for r in await conn.fetch("SELECT DISTINCT type FROM resources ORDER BY 1")]
        page = await conn.prepare(PG_PAGE_SQL)
        for type_ in types:
            with open(out / f"{type_}.ndjson", "wb") as handle:  # noqa: ASYNC230
                after = 0
                while True:
                    rows = await page.fetch(type_, after, snap, PAGE)
                    if not rows:
                        break
                    data = b"\n".join(r[1] for r in rows) + b"\n"
                    handle.write(data)
                    resources += len(rows)
                    nbytes += len(data)
                    after = rows[-1][0]
                    if len(rows) < PAGE:
                        break
                handle.flush()
                os.fsync(handle.fileno())
    finally:
        await conn.close()
    return resources, nbytes


def _blocks(conn: sqlite3.Connection, type_: str, snap: int) -> Iterator[tuple[int, bytes]]:
    """(resources, block) of ``type_``: exactly ``BLOCK`` bytes, the last one shorter."""
    buffer = bytearray()
    count = 0
    for n, data in pages(conn, type_, snap):
        buffer += data
        count += n
        while len(buffer) >= BLOCK:
            yield count, bytes(buffer[:BLOCK])
            del buffer[:BLOCK]
            count = 0
    if buffer or count:
        yield count, bytes(buffer)


def _block_id(index: int) -> str:
    return f"{index:08d}"


def scan_to_azure(
    store: Path,
    container: ContainerClient,
    prefix: str,
    *,
    overlapped: bool,
    md5: bool = False,
    uploads: int = 2,
) -> tuple[int, int]:
    """Loop (b): (resources, bytes) uploaded as block blobs ``prefix/<Type>.ndjson``."""
    conn = connect(store)
    resources = nbytes = 0
    pool = ThreadPoolExecutor(uploads) if overlapped else None
    in_flight = threading.BoundedSemaphore(uploads + 2)

    def stage(blob: str, block_id: str, data: bytes) -> None:
        try:
            container.get_blob_client(blob).stage_block(
                block_id, data, length=len(data), validate_content=md5
            )
        finally:
            in_flight.release()

    staged: list[Future[None]] = []
    blobs: dict[str, list[str]] = {}
    try:
        snap, types = snapshot(conn)
        for type_ in types:
            blob = f"{prefix}/{type_}.ndjson"
            ids = blobs.setdefault(blob, [])
            for count, data in _blocks(conn, type_, snap):
                resources += count
                nbytes += len(data)
                ids.append(_block_id(len(ids)))
                in_flight.acquire()
                if pool is None:
                    stage(blob, ids[-1], data)
                else:
                    staged.append(pool.submit(stage, blob, ids[-1], data))
        # The reader never waits at a type boundary: each blob is committed once all
        # blocks are staged.
        for future in staged:
            future.result()
        for blob, ids in blobs.items():
            container.get_blob_client(blob).commit_block_list([BlobBlock(i) for i in ids])
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        conn.close()
    return resources, nbytes


def main() -> None:
    store, out = sys.argv[1], Path(sys.argv[2])
    started = time.perf_counter()
    if store.startswith("postgresql://"):
        resources, nbytes = asyncio.run(scan_postgres_to_files(store, out))
    else:
        resources, nbytes = scan_to_files(Path(store), out)
    seconds = time.perf_counter() - started
    print(f"{resources} resources, {nbytes / 1e6:.1f} MB in {seconds:.2f}s")


if __name__ == "__main__":
    main()
