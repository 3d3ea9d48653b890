"""In-memory operation data store; one process, one event loop."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from datastore.operations import Job, JobControl, OperationDataStore
from exportsvc.errors import LeaseLost, TooManyJobs
from exportsvc.records import ACTIVE_STATUSES, JobRecord, JobStatus

R = TypeVar("R", bound=JobRecord)

_CLEANABLE = frozenset(
    {JobStatus.QUEUED, JobStatus.RETRIABLE, JobStatus.PAUSED, JobStatus.COMPLETED, JobStatus.FAILED}
)


class MemoryOperationDataStore(OperationDataStore):
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self.secrets: dict[str, bytes] = {}
        self.claims: dict[str, datetime] = {}

    def _copy(self, record: R) -> R:
        return record.model_copy(deep=True)

    async def create_job(
        self, record: Job, children: Sequence[Job] = (), *, max_active_per_client: int
    ) -> tuple[Job, bool]:
        active = [
            job
            for job in self._jobs.values()
            if job.client == record.client
            and job.parent_id is None
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
        for job in (record, *children):
            self._jobs[job.id] = self._copy(job)
        return self._copy(record), True

    async def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        return self._copy(job) if job else None

    async def children(self, parent_id: str) -> list[Job]:
        return [self._copy(j) for j in self._jobs.values() if j.parent_id == parent_id]

    def _runnable(self, job: Job, now: datetime) -> bool:
        if job.kind == "import":
            return False
        if job.cancel_requested and (
            job.status in _CLEANABLE or (job.status == JobStatus.RUNNING and not job.lease.owner)
        ):
            return True
        if job.status == JobStatus.RUNNING:
            return job.lease.expires_at is not None and job.lease.expires_at < now
        if job.pause_requested:
            return False
        if job.status == JobStatus.RETRIABLE:
            return job.retry_after is None or job.retry_after <= now
        return job.status in (JobStatus.QUEUED, JobStatus.PAUSED)

    async def acquire(self, owner: str, lease_seconds: float, now: datetime) -> Job | None:
        candidates = [j for j in self._jobs.values() if self._runnable(j, now)]
        if not candidates:
            return None
        job = min(candidates, key=lambda j: j.created_at)
        if job.status == JobStatus.RUNNING and job.lease.owner:
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
        if (
            job is None
            or job.lease.version != version
            or job.status != JobStatus.RUNNING
            or job.lease.owner is None
        ):
            raise LeaseLost()
        job.lease.expires_at = now + timedelta(seconds=lease_seconds)
        return JobControl(job.cancel_requested, job.pause_requested)

    async def save(self, record: JobRecord) -> None:
        self.save_now(record)

    def save_now(self, record: JobRecord) -> None:
        job = self._jobs.get(record.id)
        if job is None or job.lease.version != record.lease.version:
            raise LeaseLost()
        saved: Job = self._copy(record)  # type: ignore[assignment]
        saved.cancel_requested = job.cancel_requested
        saved.pause_requested = job.pause_requested
        if saved.lease.owner is not None:  # while held, the expiry is the heartbeat's
            saved.lease.expires_at = job.lease.expires_at or saved.lease.expires_at
        self._jobs[record.id] = saved

    async def add_children(self, parent: JobRecord, children: Sequence[Job]) -> None:
        self.save_now(parent)  # fenced first: raises LeaseLost before anything is added
        for child in children:
            self._jobs[child.id] = self._copy(child)

    async def settle(self, parent_id: str) -> None:
        parent = self._jobs[parent_id]
        statuses = {j.status for j in self._jobs.values() if j.parent_id == parent_id}
        if statuses & ACTIVE_STATUSES:
            parent.status = JobStatus.RUNNING
        elif statuses <= {JobStatus.COMPLETED}:
            parent.status = JobStatus.COMPLETED
        elif JobStatus.CANCELLED in statuses:
            parent.status = JobStatus.CANCELLED
        else:
            parent.status = JobStatus.FAILED

    def _family(self, job_id: str) -> list[Job]:
        return [j for j in self._jobs.values() if j.id == job_id or j.parent_id == job_id]

    async def request_pause(self, job_id: str, pause: bool) -> bool:
        job = self._jobs.get(job_id)
        if job is None or not job.visible or job.status not in ACTIVE_STATUSES:
            return False
        for j in self._family(job_id):
            if j.visible and j.status in ACTIVE_STATUSES:
                j.pause_requested = pause
        return True

    async def request_cancel(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None or not job.visible:
            return False
        for j in self._family(job_id):
            if j.visible:
                j.cancel_requested = True
        return True

    async def list(self, *, client: str | None = None, limit: int = 100) -> list[Job]:
        jobs = [
            j
            for j in self._jobs.values()
            if j.parent_id is None and (client is None or j.client == client)
        ]
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return [self._copy(j) for j in jobs[:limit]]

    async def put_secret(self, name: str, ciphertext: bytes) -> None:
        self.secrets[name] = ciphertext

    async def get_secret(self, name: str) -> bytes | None:
        return self.secrets.get(name)

    async def delete_secret(self, name: str) -> None:
        self.secrets.pop(name, None)

    async def claim(self, key: str, expires_at: datetime, now: datetime) -> bool:
        self.claims = {k: e for k, e in self.claims.items() if e > now}
        if key in self.claims:
            return False
        self.claims[key] = expires_at
        return True
