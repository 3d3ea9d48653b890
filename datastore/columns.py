"""How a job record maps to the store's indexed columns, shared by the SQL backends."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from exportsvc.records import JobRecord, JobStatus, Lease, load_record

if TYPE_CHECKING:
    from datastore.operations import Job


def epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def from_epoch(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def record_from_row(row: Sequence[Any]) -> Job:
    """``row`` = (record, status, owner, version, expires, restarts, cancel, pause)."""
    record = load_record(row[0])
    record.status = JobStatus(row[1])
    record.lease = Lease(owner=row[2], version=row[3], expires_at=from_epoch(row[4]))
    record.restart_count = row[5]
    record.cancel_requested = bool(row[6])
    record.pause_requested = bool(row[7])
    return record


def insert_params(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "kind": record.kind,
        "client": record.client,
        "fingerprint": record.fingerprint,
        "parent_id": record.parent_id,
        "status": record.status.value,
        "lease_version": record.lease.version,
        "retry_after": epoch(record.retry_after),
        "created_at": epoch(record.created_at),
        "record": record.model_dump_json(),
    }


def save_params(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "version": record.lease.version,
        "status": record.status.value,
        "owner": record.lease.owner,
        "expires": epoch(record.lease.expires_at),
        "retry_after": epoch(record.retry_after),
        "restart_count": record.restart_count,
        "record": record.model_dump_json(),
    }
