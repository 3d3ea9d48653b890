"""Fixtures shared by every tier: settings in a temp dir, stores of every backend."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from datastore.memory import MemoryOperationDataStore, MemoryResourceStore
from datastore.operations import OperationDataStore
from datastore.postgres import PostgresDatabase, PostgresOperationDataStore, PostgresResourceStore
from datastore.resources import ResourceStore
from datastore.sqlite import SqliteOperationDataStore, SqliteResourceStore
from datastore.sqlite.db import SqliteDatabase
from exportsvc.settings import Settings
from tests.azurite import Azurite
from tests.postgres import PostgresCluster


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """One Azurite for the session (in memory); tests use their own containers."""
    with Azurite() as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_file_bytes=4096, block_bytes=1024, auth="off")


BACKENDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the session; each test makes its own database."""
    with PostgresCluster() as cluster:
        yield cluster


async def postgres_database(request: pytest.FixtureRequest) -> PostgresDatabase:
    """A fresh, migrated database on the session's cluster (started on first use only)."""
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    dsn = await cluster.acreate_database(f"t_{uuid.uuid4().hex[:20]}")
    return PostgresDatabase(dsn, max_size=10, migrate=True)


@pytest.fixture(params=BACKENDS)
async def operations(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OperationDataStore]:
    store: OperationDataStore
    if request.param == "memory":
        store = MemoryOperationDataStore()
    elif request.param == "sqlite":
        store = SqliteOperationDataStore(tmp_path / "ops.sqlite3")
    else:
        store = PostgresOperationDataStore(await postgres_database(request))
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=BACKENDS)
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[OperationDataStore, ResourceStore]]:
    """Both stores sharing one database (so a write and a checkpoint share a transaction)."""
    operations: OperationDataStore
    resources: ResourceStore
    if request.param == "memory":
        memory_operations = MemoryOperationDataStore()
        operations, resources = memory_operations, MemoryResourceStore(memory_operations)
    elif request.param == "sqlite":
        database = SqliteDatabase(tmp_path / "shared.sqlite3")
        operations, resources = SqliteOperationDataStore(database), SqliteResourceStore(database)
    else:
        shared = await postgres_database(request)
        operations, resources = PostgresOperationDataStore(shared), PostgresResourceStore(shared)
    await operations.open()
    await resources.open()
    yield operations, resources
    await resources.close()
    await operations.close()


@pytest.fixture(params=[*BACKENDS, "postgres-copy"])
async def resources(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ResourceStore]:
    store: ResourceStore
    if request.param == "memory":
        store = MemoryResourceStore()
    elif request.param == "sqlite":
        store = SqliteResourceStore(tmp_path / "res.sqlite3")
    else:  # "postgres-copy": every insert through binary COPY, however small
        threshold = 1 if request.param == "postgres-copy" else 1000
        store = PostgresResourceStore(await postgres_database(request), copy_threshold=threshold)
    await store.open()
    yield store
    await store.close()
