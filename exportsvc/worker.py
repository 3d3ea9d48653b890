"""The worker: acquires jobs, runs their tasks with a heartbeat, drains on shutdown.

It waits on "work OR timer OR stop", never a bare sleep. Each running job has a heartbeat
that renews the lease and brings cancel and pause requests. Shutdown has two phases: every
task is asked to drain (commit, checkpoint, release to ``queued``), and after the grace
period the rest are cancelled; their last checkpoint stays, and the lease is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

from datastore.operations import Job, OperationDataStore
from datastore.resources import ResourceStore
from destinations import DestinationFactory
from exportsvc.errors import ExportSvcError, LeaseLost
from exportsvc.export_task import ExportItemTask, ExportPlanTask
from exportsvc.import_task import ImportBatchTask
from exportsvc.preparer import PREPARER
from exportsvc.records import (
    ExportItemRecord,
    ExportJobRecord,
    ImportBatchRecord,
    JobRecord,
    JobStatus,
    utcnow,
)
from exportsvc.secrets import SecretStore
from exportsvc.settings import Settings
from exportsvc.tasks import JobSignals, JobTask, shielded

log = logging.getLogger(__name__)


def backoff_seconds(failures: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in its upper half."""
    ceiling = min(settings.retry_max_seconds, settings.retry_base_seconds * 2.0 ** (failures - 1))
    draw: float = (rng or random).random()
    return ceiling * (0.5 + 0.5 * draw)


def _report_lost(record: JobRecord, signals: JobSignals) -> None:
    """Say once per lease that another worker owns the job now (the heartbeat and the
    task can each find out first), and stop the task at its next step."""
    if not signals.lost.is_set():
        log.warning("job.lease_lost", extra={"job": record.id})
        signals.lost.set()


@dataclass(slots=True)
class _Running:
    task: asyncio.Task[None]
    signals: JobSignals
    record: Job
    heartbeat: asyncio.Task[None] | None = None
    poke: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Worker:
    operations: OperationDataStore
    resources: ResourceStore
    secrets: SecretStore
    destinations: DestinationFactory
    settings: Settings
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _running: dict[str, _Running] = field(default_factory=dict)
    _serving: bool = False
    """Between the start and the end of :meth:`run`."""

    def wake(self, job_id: str = "") -> None:
        """New work may be there, or ``job_id`` changed (a kick-off, cancel or pause, in
        this process or announced by the database): look now, not at the next poll."""
        self._wake.set()
        for running in self._running.values():
            if job_id and job_id in (running.record.id, running.record.parent_id):
                running.poke.set()  # heartbeat at once: it brings the cancel or pause

    def expect_import(self) -> None:
        """An import was kicked off in this process: while this worker runs, start the
        process that prepares import blocks now, so its start-up overlaps the kick-off
        and the lease instead of delaying the first block."""
        if self._serving and not self._stop.is_set():
            PREPARER.start()

    def stop(self) -> None:
        """Begin the drain: stop acquiring, let running jobs reach a commit."""
        self._stop.set()
        self._wake.set()

    @property
    def running_jobs(self) -> list[str]:
        return sorted({r.record.id for r in self._running.values()})

    async def run(self) -> None:
        log.info("worker.started", extra={"worker": self.name})
        self._serving = True
        try:
            async with self.operations.listen(self.wake):
                await self._loop()
        finally:
            self._serving = False
            await self._drain()
            log.info("worker.stopped", extra={"worker": self.name})

    async def _loop(self) -> None:
        """Fill free slots, then wait for a wake-up, a finished task or the poll timer."""
        while not self._stop.is_set():
            await self._fill()
            self._wake.clear()
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
            waits += [r.task for r in self._running.values()]
            await asyncio.wait(
                waits,
                timeout=self.settings.poll_interval_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
            waits[0].cancel()

    async def _fill(self) -> None:
        while len(self._running) < self.settings.worker_concurrency and not self._stop.is_set():
            try:
                record = await self.operations.acquire(
                    self.name, self.settings.lease_seconds, utcnow()
                )
            except ExportSvcError:
                log.exception("worker.acquire_failed")
                return
            if record is None:
                return
            log.info(
                "job.acquired",
                extra={"job": record.id, "version": record.lease.version, "worker": self.name},
            )
            signals = JobSignals()
            if record.cancel_requested:
                signals.cancel.set()
            task = asyncio.create_task(self._process(record, signals), name=f"job-{record.id}")
            running = _Running(task, signals, record)
            running.heartbeat = asyncio.create_task(self._heartbeat(running))
            # Keyed by lease: a job this worker lost and took back runs under a new key.
            key = f"{record.id}:{record.lease.version}"
            self._running[key] = running
            task.add_done_callback(partial(self._finished, key))

    def _finished(self, job_id: str, _task: asyncio.Task[None]) -> None:
        running = self._running.pop(job_id, None)
        if running is not None and running.heartbeat is not None:
            running.heartbeat.cancel()
        self._wake.set()

    async def _heartbeat(self, running: _Running) -> None:
        """Renew the lease every third of it, or at once when poked; deliver controls."""
        record, signals = running.record, running.signals
        interval = self.settings.lease_seconds / 3
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(running.poke.wait(), interval)
            running.poke.clear()
            try:
                control = await self.operations.heartbeat(
                    record.id, record.lease.version, self.settings.lease_seconds, utcnow()
                )
            except LeaseLost:
                if signals.released.is_set() or await self._given_back(record):
                    signals.lost.set()  # its own task let go: nothing was lost
                else:
                    _report_lost(record, signals)
                return
            except Exception:
                log.exception("job.heartbeat_failed", extra={"job": record.id})
                continue
            if control.cancel_requested:
                signals.cancel.set()
            if control.pause_requested:
                signals.pause.set()

    async def _given_back(self, record: Job) -> bool:
        """Whether the job's own task released the lease (the same lease version, and no
        owner): the save that releases it can wake this heartbeat (PostgreSQL's NOTIFY),
        whose renewal then finds the lease gone before the task has said it let go."""
        try:
            stored = await self.operations.get(record.id)
        except Exception:
            return False
        return (
            stored is not None
            and stored.lease.version == record.lease.version
            and stored.lease.owner is None
        )

    async def _process(self, record: Job, signals: JobSignals) -> None:
        if record.restart_count > self.settings.max_restarts and not record.cancel_requested:
            await self._fail(
                record,
                signals,
                ExportSvcError(
                    f"the job was interrupted {record.restart_count} times without finishing "
                    "(worker crashes); it was stopped to avoid looping forever"
                ),
                final=True,
            )
            return
        facilities: dict[str, Any] = {
            "operations": self.operations,
            "resources": self.resources,
            "secrets": self.secrets,
            "destinations": self.destinations,
            "settings": self.settings,
            "signals": signals,
        }
        task: JobTask[Any]
        if isinstance(record, ExportJobRecord):
            task = ExportPlanTask(record, **facilities)
        elif isinstance(record, ExportItemRecord):
            task = ExportItemTask(record, **facilities)
        elif isinstance(record, ImportBatchRecord):
            task = ImportBatchTask(record, **facilities)
        else:
            raise AssertionError(f"no task runs {record.kind} records")
        try:
            await task.run()
        except LeaseLost:
            _report_lost(record, signals)
        except asyncio.CancelledError:
            await shielded(self._release_after_cancel(record, signals))
            raise
        except ExportSvcError as exc:
            await self._fail(record, signals, exc)
        except Exception as exc:
            log.exception("job.crashed", extra={"job": record.id})
            error = ExportSvcError("internal error while exporting")
            await self._fail(record, signals, error, cause=exc)

    async def _fail(
        self,
        record: JobRecord,
        signals: JobSignals,
        exc: ExportSvcError,
        *,
        final: bool = False,
        cause: BaseException | None = None,
    ) -> None:
        """Count a failure against the last checkpoint: ``retriable`` or ``failed``.

        A task whose lease another worker took often fails before its heartbeat notices
        (a stalled writer's next commit meets the new owner's ETag): that failure is not
        the job's, so it counts nothing, and the worker says the lease was lost.
        """
        stored = await self.operations.get(record.id)
        if stored is None or stored.lease.version != record.lease.version:
            _report_lost(record, signals)
            return
        stored.failure_count += 1
        stored.last_error = exc.message
        retriable = (exc.retriable or cause is not None) and not final
        if retriable and stored.failure_count < self.settings.max_failures:
            delay = backoff_seconds(stored.failure_count, self.settings)
            stored.status = JobStatus.RETRIABLE
            stored.retry_after = utcnow() + timedelta(seconds=delay)
            log.warning(
                "job.retriable",
                extra={"job": record.id, "failures": stored.failure_count, "error": exc.message},
            )
        else:
            stored.status = JobStatus.FAILED
            stored.error_status = exc.status if exc.status >= 400 else 500
            stored.completed_at = utcnow()
            log.error("job.failed", extra={"job": record.id, "error": exc.message})
        stored.lease.owner = None
        stored.lease.expires_at = None
        try:
            await shielded(self.operations.save(stored))
        except LeaseLost:
            _report_lost(record, signals)
            return
        if stored.status == JobStatus.FAILED and stored.secret_name:
            await self.secrets.delete(stored.secret_name)
        if stored.status == JobStatus.FAILED and stored.parent_id:
            await self.operations.settle(stored.parent_id)

    async def _release_after_cancel(self, record: JobRecord, signals: JobSignals) -> None:
        """Past the drain grace: keep the last checkpoint, hand the job back to the queue."""
        stored = await self.operations.get(record.id)
        if stored is None or stored.lease.version != record.lease.version:
            _report_lost(record, signals)
            return
        stored.status = JobStatus.QUEUED
        stored.lease.owner = None
        stored.lease.expires_at = None
        try:
            await self.operations.save(stored)
        except LeaseLost:
            _report_lost(record, signals)
            return
        log.info("job.released", extra={"job": record.id})

    async def _drain(self) -> None:
        if not self._running:
            return
        running = list(self._running.values())
        for r in running:
            r.signals.drain.set()
        tasks = [r.task for r in running]
        _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_grace_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in running:
            if r.heartbeat is not None:
                r.heartbeat.cancel()
