"""The operation data store: job records, the queue and the leases (DESIGN.md section 3).

Every worker write is fenced: it names the lease version it holds, and a store refuses a
stale one with :class:`~exportsvc.errors.LeaseLost`. Acquisition is atomic, so two
workers never hold one job.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime

from exportsvc.records import ExportJobRecord


@dataclass(frozen=True, slots=True)
class JobControl:
    """What a heartbeat brings back to the worker that holds a job."""

    cancel_requested: bool
    pause_requested: bool


class OperationDataStore(abc.ABC):
    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect and create the schema."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def create_export(
        self, record: ExportJobRecord, *, max_active_per_client: int
    ) -> tuple[ExportJobRecord, bool]:
        """Queue ``record``; or return the client's active job with the same fingerprint.

        Returns ``(record, created)``. Raises ``TooManyJobs`` when the client already has
        ``max_active_per_client`` active jobs. Check and insert are one transaction.
        """

    @abc.abstractmethod
    async def get(self, job_id: str) -> ExportJobRecord | None:
        """The record as last checkpointed, with its control columns overlaid."""

    @abc.abstractmethod
    async def acquire(
        self, owner: str, lease_seconds: float, now: datetime
    ) -> ExportJobRecord | None:
        """Lease the oldest runnable job to ``owner`` and bump its fencing version.

        Runnable: ``queued``; ``retriable`` whose ``retry_after`` has passed; ``running``
        whose lease expired (``restart_count`` += 1); or any not-yet-cancelled job with a
        cancel request and no live lease (the worker then cleans it up).
        """

    @abc.abstractmethod
    async def heartbeat(
        self, job_id: str, version: int, lease_seconds: float, now: datetime
    ) -> JobControl:
        """Extend the lease; raises ``LeaseLost`` when ``version`` is stale."""

    @abc.abstractmethod
    async def save(self, record: ExportJobRecord) -> None:
        """Persist ``record`` fenced by ``record.lease.version``; raises ``LeaseLost``.

        Writes everything but the control columns clients own (cancel, pause). Whoever
        read the record without a lease (an operator's retry) may save it too: the same
        version check refuses it if a worker acquired the job meanwhile.
        """

    @abc.abstractmethod
    async def request_pause(self, job_id: str, pause: bool) -> bool:
        """Set or clear an active job's pause request; False when there is no such job.

        A paused job is never acquired; a running one pauses at its next page (checkpoint,
        status ``paused``). Clearing the request makes a ``paused`` job runnable again.
        """

    @abc.abstractmethod
    async def request_cancel(self, job_id: str) -> bool:
        """Flag a visible job for cancellation; False when there is no such job."""

    @abc.abstractmethod
    async def list(self, *, client: str | None = None, limit: int = 100) -> list[ExportJobRecord]:
        """Jobs, newest first."""

    # -- secrets: ciphertext only (``exportsvc.secrets`` encrypts and decrypts) ------------

    @abc.abstractmethod
    async def put_secret(self, name: str, ciphertext: bytes) -> None: ...

    @abc.abstractmethod
    async def get_secret(self, name: str) -> bytes | None: ...

    @abc.abstractmethod
    async def delete_secret(self, name: str) -> None: ...
