"""ExportJobTask: runs one leased export job from its last checkpoint (DESIGN.md section 4).

The loop: read a page by continuation point, append each resource's stored bytes to the
current file of its type (rolling at ``max_file_bytes``), and every N pages or T seconds
commit every touched file and only then persist the checkpoint. Whatever stops the task
(completion, drain, pause, cancel) goes through a commit first, and every record write is
fenced by the lease version and shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import orjson

from datastore.operations import OperationDataStore
from datastore.resources import ExportQuery, ResourceStore, Row
from destinations import DestinationFactory, ExportDestinationClient, file_name
from exportsvc.errors import InvalidRequest, LeaseLost, SecretNotFound
from exportsvc.fhir.compartment import PATIENT_COMPARTMENT
from exportsvc.fhir.group import member_ids
from exportsvc.records import (
    ExportJobRecord,
    ExportKind,
    FileRole,
    JobStatus,
    OutputFile,
    TypeProgress,
    utcnow,
)
from exportsvc.secrets import SecretStore
from exportsvc.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class JobSignals:
    """Set by the worker (drain) and the heartbeat (cancel, pause, lease lost)."""

    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    pause: asyncio.Event = field(default_factory=asyncio.Event)
    drain: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)


async def shielded(awaitable: Awaitable[T]) -> T:
    """Run a record write to its end even if the caller is cancelled meanwhile."""
    return await asyncio.shield(asyncio.ensure_future(awaitable))


def error_line(diagnostics: str, code: str = "invalid", severity: str = "warning") -> bytes:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }
    return orjson.dumps(outcome) + b"\n"


class ExportJobTask:
    def __init__(
        self,
        record: ExportJobRecord,
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
        self._group_members: list[str] | None = None

    @property
    def dest(self) -> ExportDestinationClient:
        assert self._dest is not None, "destination not connected"
        return self._dest

    async def run(self) -> None:
        record = self.record
        if record.cancel_requested:
            await self._cancel()
            return
        secret = await self.secrets.get(record.secret_name or "")
        self._dest = self.destinations.create(record.id, secret)
        try:
            await self.dest.connect()
            await self.dest.restore(record.output)
            log.info(
                "job.started",
                extra={
                    "job": record.id,
                    "version": record.lease.version,
                    "pages_read": record.pages_read,
                    "resources": record.resources_done,
                },
            )
            if not record.progress:
                await self._prepare()
            await self._export()
        finally:
            await self.dest.close()

    # -- preparation ------------------------------------------------------------------

    async def _members(self) -> list[str] | None:
        request = self.record.request
        if request.kind != ExportKind.GROUP:
            return request.patients or None
        if self._group_members is None:
            group = await self.resources.read(
                "Group", request.group_id or "", self.record.snapshot_seq
            )
            if group is None:
                raise InvalidRequest(f"Group/{request.group_id} does not exist")
            members = member_ids(group)
            if request.patients:
                members = [m for m in members if m in set(request.patients)]
            self._group_members = members
        return self._group_members

    async def _query(self, type_: str) -> ExportQuery:
        request = self.record.request
        compartment = request.kind != ExportKind.SYSTEM
        return ExportQuery(
            type=type_,
            snapshot_seq=self.record.snapshot_seq,
            since=request.since,
            until=request.until,
            compartment=compartment,
            patients=await self._members() if compartment else None,
        )

    async def _prepare(self) -> None:
        """First run: fix the list of types, estimate the total, report ignored input."""
        record = self.record
        request = record.request
        types = request.types or await self.resources.types(record.snapshot_seq)
        if request.kind != ExportKind.SYSTEM:
            types = [t for t in types if t in PATIENT_COMPARTMENT]
        record.progress = [TypeProgress(type=t) for t in types]
        total = 0
        for t in types:
            total += await self.resources.count(await self._query(t))
        record.total_estimate = total
        record.started_at = utcnow()
        if request.ignored:
            errors = self._new_file("OperationOutcome", role="error")
            await self.dest.write(errors.name, b"".join(error_line(m) for m in request.ignored))
            errors.count = len(request.ignored)
        await self._checkpoint()

    # -- the loop ---------------------------------------------------------------------

    async def _export(self) -> None:
        record = self.record
        pages_since_commit, last_commit = 0, time.monotonic()
        for progress in record.progress:
            query = await self._query(progress.type) if not progress.done else None
            while query is not None and not progress.done:
                if await self._stop_requested():
                    return
                page = await self.resources.page(query, progress.after_seq, self.settings.page_size)
                await self._append(progress.type, page.rows)
                progress.after_seq = page.next_after
                progress.count += len(page.rows)
                progress.done = page.last
                record.resources_done += len(page.rows)
                record.pages_read += 1
                pages_since_commit += 1
                if (
                    pages_since_commit >= self.settings.commit_every_pages
                    or time.monotonic() - last_commit >= self.settings.commit_interval_seconds
                ):
                    await self._checkpoint()
                    pages_since_commit, last_commit = 0, time.monotonic()
        if await self._stop_requested():
            return
        await self._checkpoint()
        await self._complete()

    def _new_file(self, type_: str, role: FileRole = "output") -> OutputFile:
        sequence = 1 + sum(1 for f in self.record.output if f.type == type_ and f.role == role)
        f = OutputFile(type=type_, sequence=sequence, name=file_name(type_, sequence), role=role)
        self.record.output.append(f)
        self._sizes[f.name] = 0
        self._touched.add(f.name)
        return f

    def _current_file(self, type_: str) -> OutputFile | None:
        for f in reversed(self.record.output):
            if f.type == type_ and f.role == "output":
                return f
        return None

    async def _append(self, type_: str, rows: Sequence[Row]) -> None:
        """Append rows as ndjson, rolling to a new file at ``max_file_bytes``."""
        limit = self.settings.max_file_bytes
        current = self._current_file(type_)
        chunk: list[bytes] = []
        for row in rows:
            size = len(row.raw) + 1
            if current is None or (
                self._sizes[current.name] and self._sizes[current.name] + size > limit
            ):
                if current is not None and chunk:
                    await self._flush(current, chunk)
                    chunk = []
                current = self._new_file(type_)
                await self.dest.start_file(current)
            chunk.append(row.raw)
            self._sizes[current.name] += size
            current.count += 1
        if current is not None and chunk:
            await self._flush(current, chunk)

    async def _flush(self, file: OutputFile, chunk: list[bytes]) -> None:
        chunk.append(b"")
        await self.dest.write(file.name, b"\n".join(chunk))
        self._touched.add(file.name)

    # -- commit and checkpoint --------------------------------------------------------

    async def _checkpoint(self) -> None:
        """Commit every touched file, then (and only then) persist the record."""
        if self.signals.lost.is_set():
            raise LeaseLost()
        record = self.record
        touched = [f for f in record.output if f.name in self._touched]
        committed = {f.name: f for f in await self.dest.commit(touched)}
        record.output = [committed.get(f.name, f) for f in record.output]
        record.failure_count = 0
        record.retry_after = None
        await shielded(self.operations.save(record))
        self._touched.clear()
        log.info(
            "job.checkpoint",
            extra={
                "job": record.id,
                "version": record.lease.version,
                "pages_read": record.pages_read,
                "resources": record.resources_done,
                "files": len(record.output),
            },
        )

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

    async def _complete(self) -> None:
        """Mark the job done (fenced), then delete what the manifest does not list.

        In this order a worker that lost its lease can never delete the new owner's
        files: its fenced save fails first. A crash between the two leaves unlisted
        leftovers under the job's prefix, never a listed file missing."""
        record = self.record
        record.completed_at = utcnow()
        await self._release(JobStatus.COMPLETED)
        await self.dest.finalize(record.output)
        await self._forget_secret()
        log.info("job.completed", extra={"job": record.id, "resources": record.resources_done})

    async def _cancel(self) -> None:
        record = self.record
        dest = self._dest
        if dest is None:
            try:
                secret = await self.secrets.get(record.secret_name or "")
            except SecretNotFound:  # the job had ended: the service's own destination
                secret = self.destinations.secret_for(record.request.container)
            dest = self.destinations.create(record.id, secret)
        await dest.delete_all()
        await dest.close()
        record.completed_at = utcnow()
        await self._release(JobStatus.CANCELLED)
        await self._forget_secret()
        log.info("job.cancelled", extra={"job": record.id})

    async def _forget_secret(self) -> None:
        if self.record.secret_name:
            await self.secrets.delete(self.record.secret_name)
