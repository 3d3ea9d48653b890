"""Integration fixtures: a real runtime (SQLite + filesystem) in a temp dir, seeded."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr

from datastore.postgres import PostgresDatabase
from exportsvc.export_task import ExportItemTask, ExportPlanTask, JobSignals
from exportsvc.records import (
    ExportItemRecord,
    ExportJobRecord,
    ExportKind,
    ExportRequest,
    Job,
    utcnow,
)
from exportsvc.runtime import Runtime, open_runtime
from exportsvc.seed import generate
from exportsvc.settings import Settings
from exportsvc.submit import submit_export
from exportsvc.tasks import JobTask
from exportsvc.validator import ValidationReport, validate_export
from exportsvc.views import JobView


@dataclass
class Harness:
    runtime: Runtime

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    async def submit(
        self, kind: ExportKind = ExportKind.SYSTEM, **fields: object
    ) -> ExportJobRecord:
        request = ExportRequest(kind=kind, request_url="http://test/$export", **fields)  # type: ignore[arg-type]
        record, created = await submit_export(
            request,
            client="tester",
            operations=self.runtime.operations,
            resources=self.runtime.resources,
            secrets=self.runtime.secrets,
            destinations=self.runtime.destinations,
            settings=self.settings,
        )
        assert created
        return record

    async def acquire(self, owner: str = "test-worker") -> Job:
        record = await self.runtime.operations.acquire(owner, 30, utcnow())
        assert record is not None
        return record

    def task(self, record: Job, signals: JobSignals | None = None) -> JobTask[Any]:
        facilities: dict[str, Any] = {
            "operations": self.runtime.operations,
            "resources": self.runtime.resources,
            "secrets": self.runtime.secrets,
            "destinations": self.runtime.destinations,
            "settings": self.settings,
            "signals": signals,
        }
        if isinstance(record, ExportJobRecord):
            return ExportPlanTask(record, **facilities)
        assert isinstance(record, ExportItemRecord)
        return ExportItemTask(record, **facilities)

    async def run(self, record: Job) -> Job:
        await self.task(record).run()
        stored = await self.runtime.operations.get(record.id)
        assert stored is not None
        return stored

    async def run_draining(self, record: Job, read: str, at_call: int) -> Job:
        """Run ``record``'s task, asking it to drain when the resource store's ``read``
        method (``page``, ``deletions``, ``blocks``) is called the ``at_call``-th time;
        the record as the drain left it. The call that asked for the drain is the last."""
        store = self.runtime.resources
        original = getattr(store, read)
        signals = JobSignals()
        calls = 0

        async def read_then_drain(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == at_call:
                signals.drain.set()
            return await original(*args)

        setattr(store, read, read_then_drain)
        try:
            await self.task(record, signals).run()
        finally:
            setattr(store, read, original)
        # It stopped at once: nothing more was read after the drain was asked for.
        assert calls == at_call, f"{read} was called {calls} times, drained at {at_call}"
        return await self.stored(record.id)

    async def stored(self, job_id: str) -> Job:
        stored = await self.runtime.operations.get(job_id)
        assert stored is not None
        return stored

    async def plan(self) -> list[ExportItemRecord]:
        """Run the queued export's planning step; its items are queued then."""
        parent = await self.acquire()
        assert isinstance(parent, ExportJobRecord)
        await self.run(parent)
        return [
            i
            for i in await self.runtime.operations.children(parent.id)
            if isinstance(i, ExportItemRecord)
        ]

    async def run_all(self, job_id: str) -> JobView:
        """Run everything queued (planning, items) to the end; the export seen whole."""
        while (record := await self.runtime.operations.acquire("w", 30, utcnow())) is not None:
            await self.task(record).run()
        return await self.view(job_id)

    async def view(self, job_id: str) -> JobView:
        job = await self.runtime.operations.get(job_id)
        assert job is not None
        return JobView(job, await self.runtime.operations.children(job_id))

    async def validate(self, job_id: str) -> ValidationReport:
        view = await self.view(job_id)
        assert isinstance(view.job, ExportJobRecord)
        dest = self.runtime.destinations.for_job(job_id, view.job.request.container)
        return await validate_export(view, self.runtime.resources, dest)


async def a_postgres_database(request: pytest.FixtureRequest) -> SecretStr:
    """A new database on the session's cluster, migrated (what ``exportsvc migrate``
    does): the ``database_url`` setting that puts both stores in it."""
    cluster = request.getfixturevalue("postgres")
    dsn = await cluster.acreate_database(f"t_{uuid.uuid4().hex[:20]}")
    migrated = PostgresDatabase(dsn, migrate=True)
    await migrated.open()
    await migrated.close()
    return SecretStr(dsn)


@pytest.fixture(params=["sqlite-filesystem", "sqlite-azure-blob", "postgres-filesystem"])
async def harness(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Harness]:
    """The job stack on SQLite or PostgreSQL, writing to the filesystem or to Azurite."""
    update: dict[str, object] = {"page_size": 50, "commit_every_pages": 2}
    if request.param.startswith("postgres"):
        update["database_url"] = await a_postgres_database(request)
    if request.param.endswith("azure-blob"):
        azurite = request.getfixturevalue("azurite")
        update |= {
            "destination": "azure-blob",
            "azure_connection_string": SecretStr(azurite.connection_string),
            "azure_container": f"t{uuid.uuid4().hex[:20]}",
        }
    settings = settings.model_copy(update=update)
    async with open_runtime(settings) as runtime:
        await runtime.resources.write(generate(12, seed=7), keep_last_updated=True)
        yield Harness(runtime)
