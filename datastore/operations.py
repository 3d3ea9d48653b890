"""The operation data store: job records, the queue and the leases (DESIGN.md section 3).

A job is an export, or an import (a parent record) with its batches (work items, each
with ``parent_id`` set). Exports and batches are leased to workers; an import parent
never is: its status follows its batches (:meth:`settle`).

Every worker write is fenced: it names the lease version it holds, and a store refuses a
stale one with :class:`~exportsvc.errors.LeaseLost`. Acquisition is atomic, so two
workers never hold one job.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from exportsvc.records import Job, JobRecord

__all__ = ["Job", "JobControl", "OperationDataStore"]


@dataclass(frozen=True, slots=True)
class JobControl:
    """What a heartbeat brings back to the worker that holds a job."""

    cancel_requested: bool
    pause_requested: bool


class OperationDataStore(abc.ABC):
    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect; create the schema, or check it is current (PostgreSQL)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def create_job(
        self, record: Job, children: Sequence[Job] = (), *, max_active_per_client: int
    ) -> tuple[Job, bool]:
        """Queue ``record`` with its work items; or return the client's active job with
        the same fingerprint.

        Returns ``(record, created)``. Raises ``TooManyJobs`` when the client already has
        ``max_active_per_client`` active jobs. Check and inserts are one transaction, so
        no worker ever sees a job without all its work items.
        """

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The record as last checkpointed, with its control columns overlaid."""

    @abc.abstractmethod
    async def children(self, parent_id: str) -> list[Job]:
        """The work items of a job, in creation order."""

    @abc.abstractmethod
    async def acquire(self, owner: str, lease_seconds: float, now: datetime) -> Job | None:
        """Lease the oldest runnable export or work item to ``owner``; bump its fence.

        Runnable: ``queued`` (or ``paused`` with the pause lifted); ``retriable`` whose
        ``retry_after`` has passed; ``running`` whose lease expired (``restart_count``
        += 1); or any not-yet-cancelled one with a cancel request and no live lease (the
        worker then cleans it up). Paused ones are never acquired.
        """

    @abc.abstractmethod
    async def heartbeat(
        self, job_id: str, version: int, lease_seconds: float, now: datetime
    ) -> JobControl:
        """Extend the lease; raises ``LeaseLost`` when ``version`` is stale."""

    @abc.abstractmethod
    async def save(self, record: JobRecord) -> None:
        """Persist ``record`` fenced by ``record.lease.version``; raises ``LeaseLost``.

        Writes everything but the control columns clients own (cancel, pause) and, while
        the lease is held, its expiry (the heartbeat's to extend). Whoever
        read the record without a lease (an operator's retry) may save it too: the same
        version check refuses it if a worker acquired the job meanwhile.
        """

    @abc.abstractmethod
    async def add_children(self, parent: JobRecord, children: Sequence[Job]) -> None:
        """A planning worker's last step: insert the work items and save the parent,
        fenced by the parent's lease, in one transaction (``LeaseLost``: nothing done)."""

    @abc.abstractmethod
    async def settle(self, parent_id: str) -> None:
        """Recompute a parent's status from its work items: ``running`` while any is
        active, else ``completed`` when all completed, ``cancelled`` when any was
        cancelled, else ``failed``."""

    @abc.abstractmethod
    async def request_pause(self, job_id: str, pause: bool) -> bool:
        """Set or clear an active job's (and its work items') pause request.

        False when there is no such active job. A paused job is never acquired; a running
        one pauses at its next page (checkpoint, status ``paused``). Clearing the request
        makes a ``paused`` job runnable again.
        """

    @abc.abstractmethod
    async def request_cancel(self, job_id: str) -> bool:
        """Flag a visible job and its work items for cancellation; False when there is
        no such job."""

    @abc.abstractmethod
    async def list(self, *, client: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs (not work items), newest first."""

    @contextlib.asynccontextmanager
    async def listen(self, callback: Callable[[str], object]) -> AsyncIterator[None]:
        """While the block runs, call ``callback(job_id)`` when work is announced.

        Backends that can push announcements (PostgreSQL LISTEN/NOTIFY) override this;
        elsewhere workers rely on their poll interval, and a kick-off in the same process
        wakes its worker directly.
        """
        yield

    # -- secrets: ciphertext only (``exportsvc.secrets`` encrypts and decrypts) ------------

    @abc.abstractmethod
    async def put_secret(self, name: str, ciphertext: bytes) -> None: ...

    @abc.abstractmethod
    async def get_secret(self, name: str) -> bytes | None: ...

    @abc.abstractmethod
    async def delete_secret(self, name: str) -> None: ...

    # -- claims: one-time keys every process sees (client assertions' jti) --------------

    @abc.abstractmethod
    async def claim(self, key: str, expires_at: datetime, now: datetime) -> bool:
        """True the first time ``key`` is claimed; False while an earlier claim of it is
        alive (``expires_at`` still after ``now``), whichever process made it."""
