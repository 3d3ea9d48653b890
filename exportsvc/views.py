"""A job seen whole: the parent record and its work items, summed up for clients,
operators and the DataValidator."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from datastore.operations import OperationDataStore
from exportsvc.records import (
    ACTIVE_STATUSES,
    ExportItemRecord,
    ExportJobRecord,
    ImportBatchRecord,
    Job,
    JobStatus,
    OutputFile,
)


@dataclass(frozen=True)
class JobView:
    job: Job
    items: list[Job]

    @property
    def status(self) -> str:
        """What the job is doing: a job following its items is ``running`` only while an
        item holds a lease; ``queued`` when they all wait (drained), ``paused`` when all
        the waiting ones are paused."""
        job = self.job
        if job.status != JobStatus.RUNNING or not self.items:
            return job.status.value
        active = [i for i in self.items if i.status in ACTIVE_STATUSES]
        if any(i.status == JobStatus.RUNNING and i.lease.owner for i in active):
            return "running"
        if active and all(i.pause_requested or i.status == JobStatus.PAUSED for i in active):
            return "paused"
        if any(i.status == JobStatus.RETRIABLE for i in active):
            return "retriable"
        return "queued" if active else job.status.value

    @property
    def exports(self) -> list[ExportItemRecord]:
        return [i for i in self.items if isinstance(i, ExportItemRecord)]

    @property
    def batches(self) -> list[ImportBatchRecord]:
        return [i for i in self.items if isinstance(i, ImportBatchRecord)]

    @property
    def resources_done(self) -> int:
        return sum(i.resources_done for i in self.exports) + sum(
            sum(b.counts.values()) for b in self.batches
        )

    @property
    def total_estimate(self) -> int | None:
        job = self.job
        return job.total_estimate if isinstance(job, ExportJobRecord) else None

    @property
    def pages_read(self) -> int:
        return sum(i.pages_read for i in self.exports)

    @property
    def files(self) -> list[OutputFile]:
        """Every file of an export: the items' in plan order, then the error file."""
        files = [f for i in self.exports for f in i.output]
        return files + list(self.job.output)

    @property
    def started_at(self) -> datetime | None:
        starts = (self.job.started_at, *(i.started_at for i in self.items))
        return min((s for s in starts if s is not None), default=None)

    @property
    def completed_at(self) -> datetime | None:
        ends = [i.completed_at for i in self.items if i.completed_at]
        return max(ends, default=self.job.completed_at)

    @property
    def failure_count(self) -> int:
        return max([self.job.failure_count, *(i.failure_count for i in self.items)])

    @property
    def restart_count(self) -> int:
        return self.job.restart_count + sum(i.restart_count for i in self.items)

    @property
    def last_error(self) -> str | None:
        errors = [self.job.last_error, *(i.last_error for i in self.items)]
        return next((e for e in errors if e), None)

    @property
    def error_status(self) -> int:
        statuses = [i.error_status for i in (self.job, *self.items) if i.error_status]
        return max(statuses, default=500)

    @property
    def items_done(self) -> int:
        return sum(i.status == JobStatus.COMPLETED for i in self.items)


async def settled_view(operations: OperationDataStore, job: Job) -> JobView:
    """The job with its items, settled again if it still says ``running`` though every
    item has ended (a worker that died between an item's final save and the settle)."""
    items = await operations.children(job.id)
    ended = items and all(i.status not in ACTIVE_STATUSES for i in items)
    if job.status == JobStatus.RUNNING and not job.lease.owner and ended:
        await operations.settle(job.id)
        job = await operations.get(job.id) or job
    return JobView(job, items)
