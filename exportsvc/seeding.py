"""``exportsvc seed``: deterministic demo data into the store, fast.

Two processes share the work, one core each: a producer generates the resources and
prepares each first version (meta, JSON bytes, Patient compartments), and this process
only inserts them. Preparing is pure Python and would otherwise share one core (the GIL)
with the inserts.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
from multiprocessing.queues import Queue

from datastore.resources import ResourceStore
from datastore.versioning import NewVersion, new_version
from exportsvc.records import utcnow
from exportsvc.seed import generate

BATCH = 10_000


Prepared = tuple[str, str, int, int, bytes, frozenset[str]]
"""A NewVersion as a plain tuple: tuples of str and bytes pickle fast."""


def produce(patients: int, seed: int, out: Queue[list[Prepared] | None]) -> None:
    """The producer process: prepared first versions, in batches, then None."""
    gc.disable()  # the data makes no reference cycles
    now = utcnow()
    batch: list[Prepared] = []
    for resource in generate(patients, seed=seed):
        v = new_version(resource, None, now, keep_last_updated=True)
        assert v is not None
        batch.append((v.type, v.id, v.version, v.last_updated, v.raw, v.patients))
        if len(batch) == BATCH:
            out.put(batch)
            batch = []
    if batch:
        out.put(batch)
    out.put(None)


async def seed_store(store: ResourceStore, patients: int, seed: int) -> int:
    """Write the demo data; returns how many versions were created."""
    context = multiprocessing.get_context("spawn")  # inherits no event loop or threads
    queue: Queue[list[Prepared] | None] = context.Queue(maxsize=4)
    producer = context.Process(target=produce, args=(patients, seed, queue), daemon=True)
    producer.start()
    loop = asyncio.get_running_loop()
    created = 0
    gc.disable()
    try:
        while (batch := await loop.run_in_executor(None, queue.get)) is not None:
            versions = [NewVersion(*prepared) for prepared in batch]
            created += (await store.write_versions(versions)).created
    finally:
        gc.enable()
        producer.join(timeout=10)
        if producer.is_alive():
            producer.kill()
    if producer.exitcode:
        raise RuntimeError(f"the seeding process failed (exit code {producer.exitcode})")
    return created
