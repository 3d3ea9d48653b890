"""Queue an export job: the one path the API (and tests, and tools) use to create one."""

from __future__ import annotations

import uuid

from datastore.operations import Job, OperationDataStore
from datastore.resources import ResourceStore
from destinations import DestinationFactory
from exportsvc.errors import Conflict, LeaseLost, NotFound
from exportsvc.records import (
    ExportJobRecord,
    ExportRequest,
    ImportJobRecord,
    JobRecord,
    JobStatus,
)
from exportsvc.secrets import SecretStore
from exportsvc.settings import Settings


async def submit_export(
    request: ExportRequest,
    *,
    client: str,
    operations: OperationDataStore,
    resources: ResourceStore,
    secrets: SecretStore,
    destinations: DestinationFactory,
    settings: Settings,
) -> tuple[ExportJobRecord, bool]:
    """Fix the snapshot, store the destination secret, queue the job.

    Returns ``(record, created)``; ``created`` is False when the client already has an
    identical active job, which is returned instead.
    """
    if request.group_id is not None and await resources.read("Group", request.group_id) is None:
        raise NotFound(f"Group/{request.group_id} is not known to this server")
    job_id = uuid.uuid4().hex
    secret_name = f"export-{job_id}"
    # Every version committed after the snapshot is stamped after transaction_time, so
    # the next export _since this one's transactionTime gets it (ResourceStore.snapshot).
    snapshot_seq, transaction_time = await resources.snapshot()
    record = ExportJobRecord(
        id=job_id,
        client=client,
        request=request,
        fingerprint=request.fingerprint(),
        transaction_time=transaction_time,
        snapshot_seq=snapshot_seq,
        secret_name=secret_name,
    )
    await secrets.put(secret_name, destinations.secret_for(request.container))
    try:
        stored, created = await operations.create_job(
            record, max_active_per_client=settings.max_active_jobs_per_client
        )
    except BaseException:
        await secrets.delete(secret_name)
        raise
    if not created:
        await secrets.delete(secret_name)
    assert isinstance(stored, ExportJobRecord)
    return stored, created


async def retry_failed(
    job_id: str,
    *,
    operations: OperationDataStore,
    secrets: SecretStore,
    destinations: DestinationFactory,
) -> Job:
    """Queue a failed job again: it resumes from its last checkpoint, not from scratch.
    For an import, only its failed batches run again."""
    record = await operations.get(job_id)
    if record is None or not record.visible or record.parent_id is not None:
        raise NotFound(f"no job {job_id!r}")
    if record.status != JobStatus.FAILED:
        raise Conflict(f"job {job_id} is {record.status.value}; only a failed job can be retried")
    container = record.request.container if isinstance(record, ExportJobRecord) else None
    if isinstance(record, ImportJobRecord) or (
        isinstance(record, ExportJobRecord) and record.planned
    ):
        for item in await operations.children(record.id):
            if item.status == JobStatus.FAILED:
                await _requeue(item, operations, secrets, destinations, container)
        await operations.settle(record.id)
    else:  # an export that failed while planning
        await _requeue(record, operations, secrets, destinations, container)
    stored = await operations.get(job_id)
    assert stored is not None
    return stored


async def _requeue(
    record: JobRecord,
    operations: OperationDataStore,
    secrets: SecretStore,
    destinations: DestinationFactory,
    container: str | None,
) -> None:
    if record.secret_name:  # deleted when the job failed: the service's destination again
        await secrets.put(record.secret_name, destinations.secret_for(container))
    record.status = JobStatus.QUEUED
    record.failure_count = 0
    record.restart_count = 0
    record.retry_after = None
    record.error_status = None
    record.completed_at = None
    try:
        await operations.save(record)
    except LeaseLost as exc:
        raise Conflict(f"job {record.id} changed meanwhile; try again") from exc
