"""Opens what a process needs from the settings: stores, secrets, a worker factory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from datastore.operations import OperationDataStore
from datastore.postgres import PostgresDatabase, PostgresOperationDataStore, PostgresResourceStore
from datastore.resources import ResourceStore
from datastore.sqlite import SqliteOperationDataStore, SqliteResourceStore
from datastore.sqlite.db import SqliteDatabase
from destinations import DestinationFactory
from exportsvc.secrets import SecretStore, load_key
from exportsvc.settings import Settings
from exportsvc.worker import Worker


@dataclass
class Runtime:
    settings: Settings
    operations: OperationDataStore
    resources: ResourceStore
    secrets: SecretStore
    destinations: DestinationFactory

    def worker(self) -> Worker:
        return Worker(
            self.operations, self.resources, self.secrets, self.destinations, self.settings
        )


def stores(
    settings: Settings, *, migrate: bool = False
) -> tuple[OperationDataStore, ResourceStore]:
    """Both stores on one database: PostgreSQL when ``EXPORTSVC_DATABASE_URL`` is set
    (its schema must be current, or ``migrate``), else the embedded SQLite file (which
    migrates itself)."""
    if settings.database_url is not None:
        postgres = PostgresDatabase(
            settings.database_url.get_secret_value(),
            max_size=settings.database_pool_size,
            migrate=migrate,
        )
        return PostgresOperationDataStore(postgres), PostgresResourceStore(postgres)
    # A reader per task the worker runs at once: each export item reads on its own.
    database = SqliteDatabase(
        settings.database_path,
        readers=settings.worker_concurrency,
        group_rows=settings.import_group_rows,
    )
    return SqliteOperationDataStore(database), SqliteResourceStore(database)


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    operations, resources = stores(settings)
    await operations.open()
    try:
        await resources.open()
        try:
            secrets = SecretStore(operations, load_key(settings))
            destinations = DestinationFactory(settings)
            try:
                yield Runtime(settings, operations, resources, secrets, destinations)
            finally:
                await destinations.close()
        finally:
            await resources.close()
    finally:
        await operations.close()
