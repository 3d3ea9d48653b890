"""What the scenarios of one bench run share: seeded stores, ndjson inputs, Azurite, a
PostgreSQL cluster, scratch folders, and the results so far.

Everything lives under one temporary folder removed at the end. PostgreSQL is started
on first use and stopped (``pg_ctl`` on its own data directory) when the run ends;
Azurite is started afresh for each measurement and ended by its pid after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from common import ROOT, run_cli, seed
from ideal_export import scan_to_files

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.azurite import Azurite
from tests.postgres import PostgresCluster

RESOURCES_PER_PATIENT = 55


class Unavailable(Exception):
    """A scenario's external program (Azurite, PostgreSQL) is not installed."""


def patients_for(size: int) -> int:
    return max(1, round(size / RESOURCES_PER_PATIENT))


@dataclass
class Context:
    size: int
    work: Path
    repeat: int = 1
    kickoff_size: int = 400_000
    memory_reference_size: int = 100_000
    drain_trials: int = 3
    settings: dict[str, str] = field(default_factory=dict)
    """Extra ``EXPORTSVC_*`` settings (lower-case, no prefix) for every service started."""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _stores: dict[int, Path] = field(default_factory=dict)
    _seed_output: dict[int, str] = field(default_factory=dict)
    _inputs: dict[int, Path] = field(default_factory=dict)
    _postgres: PostgresCluster | None = None
    _postgres_stores: dict[int, str] = field(default_factory=dict)
    _names: itertools.count[int] = field(default_factory=itertools.count)

    def close(self) -> None:
        self.stack.close()

    def quiet(self) -> None:
        """Before a measurement starts, ideal loop or service alike, write back what
        earlier work left dirty, so that neither pays for the other's writes: the disk's
        (a store just copied, files just removed), and PostgreSQL's, where it runs (one
        100k import writes about 180 MB of WAL; past ``max_wal_size`` the server starts a
        checkpoint, which otherwise lands in whichever measurement runs then)."""
        if self._postgres is not None:
            asyncio.run(_execute(self._postgres.dsn, "CHECKPOINT"))
        os.sync()

    def scratch(self, name: str) -> Path:
        """A new empty folder; the caller removes it (or the run's end does)."""
        path = self.work / f"{name}-{next(self._names)}"
        path.mkdir(parents=True)
        return path

    def store(self, size: int) -> Path:
        """A data dir seeded with about ``size`` resources (``exportsvc seed``); cached."""
        patients = patients_for(size)
        if patients not in self._stores:
            path = self.work / f"store-{patients}p"
            self._seed_output[patients] = seed(path, patients)
            self._stores[patients] = path
        return self._stores[patients]

    def seed_note(self, size: int) -> str:
        self.store(size)
        return self._seed_output[patients_for(size)]

    def copy_store(self, size: int, name: str) -> Path:
        data = self.scratch(name)
        shutil.copytree(self.store(size), data, dirs_exist_ok=True)
        return data

    def inputs(self, size: int) -> Path:
        """ndjson files of the store of ``size`` (one per type, as loop (a) writes them)."""
        patients = patients_for(size)
        if patients not in self._inputs:
            path = self.work / f"inputs-{patients}p"
            scan_to_files(self.store(size) / "exportsvc.sqlite3", path)
            self._inputs[patients] = path
        return self._inputs[patients]

    @contextlib.contextmanager
    def azurite(self) -> Iterator[Azurite]:
        """A fresh in-memory Azurite for one measurement: an emulator that has already
        taken (and deleted) gigabytes runs slower, which would favour whatever ran first."""
        with contextlib.ExitStack() as stack:
            yield self._start(Azurite, "Azurite", stack)

    def postgres(self) -> PostgresCluster:
        if self._postgres is None:
            self._postgres = self._start(PostgresCluster, "PostgreSQL")
        return self._postgres

    def _start(self, kind: Any, name: str, stack: contextlib.ExitStack | None = None) -> Any:
        import pytest  # the helpers in tests/ skip through pytest when a program is missing

        try:
            return (stack or self.stack).enter_context(kind())
        except pytest.skip.Exception as exc:
            raise Unavailable(f"{name} is not available: {exc}") from exc

    def postgres_store(self, size: int) -> str:
        """The name of a PostgreSQL database seeded like :meth:`store` (``exportsvc seed``:
        the same resources, byte for byte) and analyzed, as a store in use would be;
        cached. A template: work on :meth:`copy_postgres_store`."""
        patients = patients_for(size)
        if patients not in self._postgres_stores:
            name = f"store_{patients}p"
            dsn = self.postgres().create_database(name)
            folder = self.scratch("seed-postgres")
            run_cli(folder, "migrate", database_url=dsn)
            run_cli(folder, "seed", "--patients", str(patients), database_url=dsn)
            shutil.rmtree(folder)
            asyncio.run(_execute(dsn, "ANALYZE"))
            self._postgres_stores[patients] = name
        return self._postgres_stores[patients]

    @contextlib.contextmanager
    def copy_postgres_store(self, size: int) -> Iterator[str]:
        """A new database for one measurement, a copy of :meth:`postgres_store`: its DSN.
        Dropped after it, as :meth:`new_database` says why."""
        template = self.postgres_store(size)
        name = f"copy_{next(self._names)}"
        with self._dropped(name):
            yield self.postgres().create_database(name, template=template)

    @contextlib.contextmanager
    def new_database(self) -> Iterator[str]:
        """A fresh PostgreSQL database with the service's schema (``exportsvc migrate``) for
        one measurement: its DSN. Dropped after it: a cluster that keeps the databases of
        earlier measurements slows the later ones (loop (c) at 100k, run after run: 2.0 to
        2.1 s for nine runs, then 2.2 to 2.9 s; 2.0 to 2.2 s for twenty runs when each
        dropped its database), which would favour whatever ran first."""
        cluster = self.postgres()
        name = f"bench_{next(self._names)}"
        with self._dropped(name):
            dsn = cluster.create_database(name)
            folder = self.scratch("migrate")
            run_cli(folder, "migrate", database_url=dsn)
            shutil.rmtree(folder)
            yield dsn

    @contextlib.contextmanager
    def _dropped(self, name: str) -> Iterator[None]:
        try:
            yield
        finally:
            self.postgres().drop_database(name)


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
