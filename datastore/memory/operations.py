"""In-memory operation data store; one process, one event loop."""

from __future__ import annotations

from datetime import datetime, timedelta

from datastore.operations import JobControl, OperationDataStore
from exportsvc.errors import LeaseLost, TooManyJobs
from exportsvc.records import ACTIVE_STATUSES, ExportJobRecord, JobStatus

_CLEANABLE = frozenset(
    {JobStatus.QUEUED, JobStatus.RETRIABLE, JobStatus.PAUSED, JobStatus.COMPLETED, JobStatus.FAILED}
)


class MemoryOperationDataStore(OperationDataStore):
    def __init__(self) -> None:
        self._jobs: dict[str, ExportJobRecord] = {}
        self.secrets: dict[str, bytes] = {}

    def _copy(self, record: ExportJobRecord) -> ExportJobRecord:
        return record.model_copy(deep=True)

    async def create_export(
        self, record: ExportJobRecord, *, max_active_per_client: int
    ) -> tuple[ExportJobRecord, bool]:
        active = [
            job
            for job in self._jobs.values()
            if job.client == record.client
            and job.status in ACTIVE_STATUSES
            and not job.cancel_requested
        ]
        for job in sorted(active, key=lambda j: j.created_at):
            if job.fingerprint == record.fingerprint:
                return self._copy(job), False
        if len(active) >= max_active_per_client:
            raise TooManyJobs(
                f"this client already has {len(active)} active export jobs "
                f"(limit {max_active_per_client}); retry when one has finished",
                headers={"Retry-After": "30"},
            )
        self._jobs[record.id] = self._copy(record)
        return self._copy(record), True

    async def get(self, job_id: str) -> ExportJobRecord | None:
        job = self._jobs.get(job_id)
        return self._copy(job) if job else None

    def _runnable(self, job: ExportJobRecord, now: datetime) -> bool:
        if job.cancel_requested and job.status in _CLEANABLE:
            return True
        if job.status == JobStatus.RUNNING:
            return job.lease.expires_at is not None and job.lease.expires_at < now
        if job.pause_requested:
            return False
        if job.status == JobStatus.RETRIABLE:
            return job.retry_after is None or job.retry_after <= now
        return job.status in (JobStatus.QUEUED, JobStatus.PAUSED)

    async def acquire(
        self, owner: str, lease_seconds: float, now: datetime
    ) -> ExportJobRecord | None:
        candidates = [j for j in self._jobs.values() if self._runnable(j, now)]
        if not candidates:
            return None
        job = min(candidates, key=lambda j: j.created_at)
        if job.status == JobStatus.RUNNING:
            job.restart_count += 1
        job.status = JobStatus.RUNNING
        job.lease.owner = owner
        job.lease.version += 1
        job.lease.expires_at = now + timedelta(seconds=lease_seconds)
        return self._copy(job)

    async def heartbeat(
        self, job_id: str, version: int, lease_seconds: float, now: datetime
    ) -> JobControl:
        job = self._jobs.get(job_id)
        if job is None or job.lease.version != version or job.status != JobStatus.RUNNING:
            raise LeaseLost()
        job.lease.expires_at = now + timedelta(seconds=lease_seconds)
        return JobControl(job.cancel_requested, job.pause_requested)

    async def save(self, record: ExportJobRecord) -> None:
        job = self._jobs.get(record.id)
        if job is None or job.lease.version != record.lease.version:
            raise LeaseLost()
        saved = self._copy(record)
        saved.cancel_requested = job.cancel_requested
        saved.pause_requested = job.pause_requested
        self._jobs[record.id] = saved

    async def request_pause(self, job_id: str, pause: bool) -> bool:
        job = self._jobs.get(job_id)
        if job is None or not job.visible or job.status not in ACTIVE_STATUSES:
            return False
        job.pause_requested = pause
        return True

    async def request_cancel(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None or not job.visible:
            return False
        job.cancel_requested = True
        return True

    async def list(self, *, client: str | None = None, limit: int = 100) -> list[ExportJobRecord]:
        jobs = [j for j in self._jobs.values() if client is None or j.client == client]
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return [self._copy(j) for j in jobs[:limit]]

    async def put_secret(self, name: str, ciphertext: bytes) -> None:
        self.secrets[name] = ciphertext

    async def get_secret(self, name: str) -> bytes | None:
        return self.secrets.get(name)

    async def delete_secret(self, name: str) -> None:
        self.secrets.pop(name, None)
