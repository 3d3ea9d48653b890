"""What every job task shares: destination, checkpoints, stop handling, final states.

A task runs one leased record (an export, or an import batch) from its last checkpoint.
Its files go through the destination commit protocol (DESIGN.md section 4): a checkpoint
commits every touched file and only then persists the record (``_persist``), fenced by
the lease version and shielded from cancellation. Cancel, pause and drain are handled at
a page boundary, always through a commit first.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

from datastore.operations import OperationDataStore
from datastore.resources import ResourceStore
from destinations import DestinationFactory, ExportDestinationClient, file_name
from exportsvc.errors import LeaseLost, SecretNotFound
from exportsvc.records import FileRole, JobRecord, JobStatus, OutputFile, utcnow
from exportsvc.secrets import SecretStore
from exportsvc.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R", bound=JobRecord)


@dataclass(slots=True)
class JobSignals:
    """Set by the worker (drain) and the heartbeat (cancel, pause, lease lost)."""

    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    pause: asyncio.Event = field(default_factory=asyncio.Event)
    drain: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    """The task gave its lease back (done, drained, paused): heartbeats stop mattering."""


async def shielded(awaitable: Awaitable[T]) -> T:
    """Run a record write to its end even if the caller is cancelled meanwhile."""
    return await asyncio.shield(asyncio.ensure_future(awaitable))


def outcome_line(diagnostics: str, code: str = "invalid", severity: str = "warning") -> bytes:
    """One OperationOutcome as an ndjson line (error files)."""
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }
    return orjson.dumps(outcome) + b"\n"


class JobTask(abc.ABC, Generic[R]):
    def __init__(
        self,
        record: R,
        *,
        operations: OperationDataStore,
        resources: ResourceStore,
        secrets: SecretStore,
        destinations: DestinationFactory,
        settings: Settings,
        signals: JobSignals | None = None,
    ) -> None:
        self.record = record
        self.operations = operations
        self.resources = resources
        self.secrets = secrets
        self.destinations = destinations
        self.settings = settings
        self.signals = signals or JobSignals()
        self._dest: ExportDestinationClient | None = None
        self._sizes: dict[str, int] = {f.name: f.committed_bytes for f in record.output}
        self._touched: set[str] = set()

    @property
    def _first_lease(self) -> bool:
        """Whether this is the record's first lease. Then no run came before this one, so
        nobody wrote under its scope: there is nothing to reconcile when it starts, nor
        to sweep when it ends (each a listing of the destination, a round trip per work
        item that waits behind the uploads of the others)."""
        return self.record.lease.version == 1

    @property
    def dest(self) -> ExportDestinationClient:
        assert self._dest is not None, "destination not connected"
        return self._dest

    @property
    @abc.abstractmethod
    def container(self) -> str | None:
        """The ``_container`` of the job (where the service's destination puts it)."""

    @property
    def folder(self) -> str:
        """The destination folder (prefix) of the task's files."""
        return self.record.id

    @property
    def scope(self) -> str | None:
        """With a scope the task owns only the files ``{scope}-...`` of its folder."""
        return None

    @property
    def cleanup_scope(self) -> str | None:
        """What a cancel deletes: the task's own files (a job: its whole folder)."""
        return self.scope

    @abc.abstractmethod
    async def _run(self) -> None:
        """The work, from the last checkpoint: ends by ``_complete`` or a stop."""

    @abc.abstractmethod
    def _progress(self) -> dict[str, Any]:
        """Counters for the log lines."""

    async def run(self) -> None:
        record = self.record
        if record.cancel_requested:
            await self._cancel()
            return
        secret = await self.secrets.get(record.secret_name or "")
        self._dest = self.destinations.create(self.folder, secret, self.scope)
        try:
            await self.dest.connect()
            if not self._first_lease:
                await self.dest.restore(record.output)
            log.info(
                "job.started",
                extra={"job": record.id, "version": record.lease.version, **self._progress()},
            )
            await self._run()
        finally:
            await self.dest.close()

    # -- files --------------------------------------------------------------------------

    def _new_file(self, type_: str, role: FileRole = "output") -> OutputFile:
        output = self.record.output
        sequence = 1 + sum(1 for f in output if f.type == type_ and f.role == role)
        name = file_name(self.scope or type_, sequence)
        new = OutputFile(type=type_, sequence=sequence, name=name, role=role)
        output.append(new)
        self._sizes[new.name] = 0
        self._touched.add(new.name)
        return new

    async def _write(self, file: OutputFile, data: bytes, count: int) -> None:
        await self.dest.write(file.name, data)
        self._sizes[file.name] += len(data)
        file.count += count
        self._touched.add(file.name)

    # -- checkpoint and stops -------------------------------------------------------------

    async def _persist(self) -> None:
        """Save the record after a commit, and say so; import batches save it with their
        resources (and say so once that has committed)."""
        await self.operations.save(self.record)
        self._checkpointed(self._checkpoint_fields())

    async def _checkpoint(self) -> None:
        """Commit every touched file, then (and only then) persist the record."""
        await self._commit_files()
        await shielded(self._persist())

    async def _commit_files(self) -> None:
        """A checkpoint's first half: commit every touched file, note their states."""
        if self.signals.lost.is_set():
            raise LeaseLost()
        record = self.record
        touched = [f for f in record.output if f.name in self._touched]
        committed = {f.name: f for f in await self.dest.commit(touched)}
        for f in record.output:  # in place: tasks may hold these objects
            if f.name in committed:
                state = committed[f.name]
                f.committed_bytes = state.committed_bytes
                f.committed_blocks = state.committed_blocks
                f.etag = state.etag
        record.failure_count = 0
        record.retry_after = None
        self._touched.clear()

    def _checkpoint_fields(self) -> dict[str, Any]:
        """What the ``job.checkpoint`` log line says of the record as it is now."""
        record = self.record
        return {
            "job": record.id,
            "version": record.lease.version,
            **self._progress(),
            "files": len(record.output),
        }

    def _checkpointed(self, fields: dict[str, Any]) -> None:
        """A checkpoint's record is saved (committed): operators and tests rely on it."""
        log.info("job.checkpoint", extra=fields)

    async def _stop_requested(self) -> bool:
        """Handle cancel, pause and drain at a page boundary; True when the task stops."""
        signals = self.signals
        if signals.lost.is_set():
            raise LeaseLost()
        if signals.cancel.is_set():
            await self._cancel()
            return True
        if signals.pause.is_set() or signals.drain.is_set():
            await self._checkpoint()
            paused = signals.pause.is_set()
            await self._release(JobStatus.PAUSED if paused else JobStatus.QUEUED)
            log.info("job.paused" if paused else "job.drained", extra={"job": self.record.id})
            return True
        return False

    async def _release(self, status: JobStatus) -> None:
        self.record.status = status
        self.record.lease.owner = None
        self.record.lease.expires_at = None
        await shielded(self.operations.save(self.record))
        self.signals.released.set()
        if self.record.parent_id and status in (JobStatus.COMPLETED, JobStatus.CANCELLED):
            await self.operations.settle(self.record.parent_id)

    async def _complete(self) -> None:
        """Mark the job done (fenced), then delete what the record does not list (after
        a first lease nothing can be unlisted: every file this run began is listed).

        In this order a worker that lost its lease can never delete the new owner's
        files: its fenced save fails first. A crash between the two leaves unlisted
        leftovers under the job's prefix, never a listed file missing."""
        record = self.record
        record.completed_at = utcnow()
        await self._release(JobStatus.COMPLETED)
        await self.dest.finalize(record.output, sweep=not self._first_lease)
        await self._forget_secret()
        log.info("job.completed", extra={"job": record.id, **self._progress()})

    async def _cancel(self) -> None:
        record = self.record
        dest = self._dest
        if dest is None:
            try:
                secret = await self.secrets.get(record.secret_name or "")
            except SecretNotFound:  # the job had ended: the service's own destination
                secret = self.destinations.secret_for(self.container)
            dest = self.destinations.create(self.folder, secret, self.cleanup_scope)
        await dest.delete_all()
        await dest.close()
        record.completed_at = utcnow()
        await self._release(JobStatus.CANCELLED)
        await self._forget_secret()
        log.info("job.cancelled", extra={"job": record.id})

    async def _forget_secret(self) -> None:
        if self.record.secret_name:
            await self.secrets.delete(self.record.secret_name)
