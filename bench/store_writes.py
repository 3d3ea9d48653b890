"""The resource store's write path alone: ``ResourceStore.write`` of Synthea-shaped
resources in batches, no jobs, no HTTP.

An initial load (every resource new) and then an incremental one: the same resources
again with every third one changed, the rest identical (so each batch compares with
stored versions). ``--service-stamps``: every version stamped by the store (an API
write, an import) instead of keeping the resources' own lastUpdated (seeding). SQLite in
a temporary folder, PostgreSQL on a throwaway cluster (``tests/postgres.py``). Prints
resources/s per backend and load, ``--rounds`` times.

    .venv/bin/python bench/store_writes.py [--patients 1000] [--batch 2000] [--rounds 2]
        [--service-stamps]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datastore.postgres import PostgresDatabase, PostgresResourceStore
from datastore.resources import ResourceStore
from datastore.sqlite import SqliteResourceStore
from exportsvc.seed import generate
from tests.postgres import PostgresCluster


async def load(
    store: ResourceStore, resources: list[Mapping[str, Any]], batch: int, keep: bool
) -> float:
    """Resources/s of writing ``resources`` in batches of ``batch``."""
    started = time.perf_counter()
    for i in range(0, len(resources), batch):
        await store.write(resources[i : i + batch], keep_last_updated=keep)
    return len(resources) / (time.perf_counter() - started)


async def measure(
    store: ResourceStore, resources: list[Mapping[str, Any]], batch: int, keep: bool
) -> str:
    await store.open()
    try:
        initial = await load(store, resources, batch, keep)
        changed = [dict(r, language="en") if n % 3 == 0 else r for n, r in enumerate(resources)]
        incremental = await load(store, changed, batch, keep)
    finally:
        await store.close()
    return f"initial {initial:,.0f}/s  incremental {incremental:,.0f}/s"


async def main(args: argparse.Namespace, cluster: PostgresCluster) -> None:
    resources: list[Mapping[str, Any]] = list(generate(args.patients, seed=1))
    keep = not args.service_stamps
    stamps = "stamped by the store" if args.service_stamps else "lastUpdated kept"
    print(f"{len(resources):,} resources, batches of {args.batch}, {stamps}")
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = SqliteResourceStore(Path(tmp) / "store.sqlite3")
            print("sqlite    ", await measure(sqlite, resources, args.batch, keep), flush=True)
        dsn = await cluster.acreate_database(f"w_{uuid.uuid4().hex[:12]}")
        postgres = PostgresResourceStore(PostgresDatabase(dsn, migrate=True))
        print("postgres  ", await measure(postgres, resources, args.batch, keep), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--service-stamps", action="store_true")
    arguments = parser.parse_args()
    with PostgresCluster() as pg:
        asyncio.run(main(arguments, pg))
