"""Fixtures shared by every tier: settings in a temp dir, stores of every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from datastore.memory import MemoryOperationDataStore, MemoryResourceStore
from datastore.operations import OperationDataStore
from datastore.resources import ResourceStore
from datastore.sqlite import SqliteOperationDataStore, SqliteResourceStore
from datastore.sqlite.db import SqliteDatabase
from exportsvc.settings import Settings
from tests.azurite import Azurite


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """One Azurite for the session (in memory); tests use their own containers."""
    with Azurite() as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_file_bytes=4096, block_bytes=1024)


@pytest.fixture(params=["memory", "sqlite"])
async def operations(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OperationDataStore]:
    store: OperationDataStore
    if request.param == "memory":
        store = MemoryOperationDataStore()
    else:
        store = SqliteOperationDataStore(tmp_path / "ops.sqlite3")
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=["memory", "sqlite"])
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[OperationDataStore, ResourceStore]]:
    """Both stores sharing one database (so a write and a checkpoint share a transaction)."""
    operations: OperationDataStore
    resources: ResourceStore
    if request.param == "memory":
        memory_operations = MemoryOperationDataStore()
        operations, resources = memory_operations, MemoryResourceStore(memory_operations)
    else:
        database = SqliteDatabase(tmp_path / "shared.sqlite3")
        operations, resources = SqliteOperationDataStore(database), SqliteResourceStore(database)
    await operations.open()
    await resources.open()
    yield operations, resources
    await resources.close()
    await operations.close()


@pytest.fixture(params=["memory", "sqlite"])
async def resources(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ResourceStore]:
    store: ResourceStore
    if request.param == "memory":
        store = MemoryResourceStore()
    else:
        store = SqliteResourceStore(tmp_path / "res.sqlite3")
    await store.open()
    yield store
    await store.close()
