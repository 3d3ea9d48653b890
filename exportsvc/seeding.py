"""``exportsvc seed``: deterministic demo data into the store, fast.

Two processes share the work, one core each: a producer (``python -m exportsvc.seed``,
which imports only the generator) generates the resources and prepares each first
version (meta, JSON bytes, Patient compartments) and pipes them over in pickled batches;
this process only inserts them. Preparing is pure Python and would otherwise share one
core (the GIL) with the inserts.
"""

from __future__ import annotations

import asyncio
import gc
import pickle
import subprocess
import sys
from typing import IO

from datastore.resources import ResourceStore
from datastore.versioning import NewVersion
from exportsvc.seed import Prepared


def _next_batch(stream: IO[bytes]) -> list[NewVersion] | None:
    try:
        batch: list[Prepared] | None = pickle.load(stream)  # our own child's output
    except EOFError:
        raise RuntimeError("the seeding process ended before its data did") from None
    return None if batch is None else [NewVersion(*prepared) for prepared in batch]


async def seed_store(store: ResourceStore, patients: int, seed: int) -> int:
    """Write the demo data; returns how many versions were created."""
    command = [sys.executable, "-m", "exportsvc.seed", str(patients), str(seed)]
    loop = asyncio.get_running_loop()
    producer = await loop.run_in_executor(None, _start, command)
    assert producer.stdout is not None
    created = 0
    gc.disable()  # the batches make no reference cycles
    # The next batch is read while the store writes this one.
    reading = loop.run_in_executor(None, _next_batch, producer.stdout)
    try:
        while versions := await reading:
            reading = loop.run_in_executor(None, _next_batch, producer.stdout)
            created += (await store.write_versions(versions)).created
    finally:
        if not reading.done():
            reading.cancel()
        gc.enable()
        producer.stdout.close()
        if producer.poll() is None and await loop.run_in_executor(None, _wait, producer):
            producer.kill()
            producer.wait()
    if producer.returncode:
        raise RuntimeError(f"the seeding process failed (exit code {producer.returncode})")
    return created


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.PIPE, bufsize=1 << 20)


def _wait(process: subprocess.Popen[bytes]) -> bool:
    """Wait up to 10 s for ``process`` to end; True if it is still running."""
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return True
    return False
