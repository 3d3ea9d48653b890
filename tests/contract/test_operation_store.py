"""The OperationDataStore contract, run against every backend."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from datastore.operations import OperationDataStore
from exportsvc.errors import LeaseLost, TooManyJobs
from exportsvc.records import ExportJobRecord, ExportKind, ExportRequest, JobStatus, utcnow


def job(client: str = "c1", types: list[str] | None = None) -> ExportJobRecord:
    request = ExportRequest(
        kind=ExportKind.SYSTEM, types=types or [], request_url="http://x/$export"
    )
    return ExportJobRecord(
        id=uuid.uuid4().hex,
        client=client,
        request=request,
        fingerprint=request.fingerprint(),
        transaction_time=utcnow(),
        snapshot_seq=0,
    )


async def test_create_get_and_dedupe(operations: OperationDataStore) -> None:
    first, created = await operations.create_job(job(), max_active_per_client=5)
    assert created
    again, created_again = await operations.create_job(job(), max_active_per_client=5)
    assert (again.id, created_again) == (first.id, False)
    other_client, created_other = await operations.create_job(job("c2"), max_active_per_client=5)
    assert created_other and other_client.id != first.id
    stored = await operations.get(first.id)
    assert stored is not None and stored.status == JobStatus.QUEUED
    assert await operations.get("missing") is None


async def test_active_job_limit_per_client(operations: OperationDataStore) -> None:
    await operations.create_job(job(types=["Patient"]), max_active_per_client=2)
    await operations.create_job(job(types=["Observation"]), max_active_per_client=2)
    with pytest.raises(TooManyJobs) as info:
        await operations.create_job(job(types=["Condition"]), max_active_per_client=2)
    assert info.value.status == 429 and "Retry-After" in info.value.headers
    await operations.create_job(job("other", types=["Condition"]), max_active_per_client=2)


async def test_acquire_is_exclusive_and_fenced(operations: OperationDataStore) -> None:
    record, _ = await operations.create_job(job(), max_active_per_client=5)
    now = utcnow()
    got = await asyncio.gather(*(operations.acquire(f"w{i}", 30, now) for i in range(5)))
    winners = [g for g in got if g is not None]
    assert len(winners) == 1
    leased = winners[0]
    assert leased.status == JobStatus.RUNNING and leased.lease.version == 1
    assert await operations.acquire("late", 30, now) is None

    # The lease expires: another worker takes over with a new fencing version.
    later = now + timedelta(seconds=31)
    taken = await operations.acquire("w-next", 30, later)
    assert taken is not None and taken.lease.version == 2 and taken.restart_count == 1
    leased.last_error = "stale"
    with pytest.raises(LeaseLost):
        await operations.save(leased)
    with pytest.raises(LeaseLost):
        await operations.heartbeat(record.id, leased.lease.version, 30, later)
    taken.last_error = "fresh"
    await operations.save(taken)
    stored = await operations.get(record.id)
    assert stored is not None and stored.last_error == "fresh"


async def test_cancel_request_survives_a_checkpoint(operations: OperationDataStore) -> None:
    record, _ = await operations.create_job(job(), max_active_per_client=5)
    leased = await operations.acquire("w", 30, utcnow())
    assert leased is not None
    assert await operations.request_cancel(record.id)
    leased.last_error = "checkpoint"
    await operations.save(leased)  # the worker's copy still says cancel_requested=False
    control = await operations.heartbeat(record.id, leased.lease.version, 30, utcnow())
    assert control.cancel_requested
    stored = await operations.get(record.id)
    assert stored is not None and stored.cancel_requested and not stored.visible
    assert stored.last_error == "checkpoint"
    # A cancelled job no longer counts against the client's limit nor deduplicates.
    _, created = await operations.create_job(job(), max_active_per_client=1)
    assert created


async def test_retriable_waits_for_retry_after(operations: OperationDataStore) -> None:
    record, _ = await operations.create_job(job(), max_active_per_client=5)
    leased = await operations.acquire("w", 30, utcnow())
    assert leased is not None
    leased.status = JobStatus.RETRIABLE
    leased.retry_after = utcnow() + timedelta(seconds=60)
    leased.lease.owner = None
    await operations.save(leased)
    assert await operations.acquire("w", 30, utcnow()) is None
    again = await operations.acquire("w", 30, utcnow() + timedelta(seconds=61))
    assert again is not None and again.id == record.id and again.restart_count == 0


async def test_cancelled_finished_job_is_acquired_for_cleanup(
    operations: OperationDataStore,
) -> None:
    record, _ = await operations.create_job(job(), max_active_per_client=5)
    leased = await operations.acquire("w", 30, utcnow())
    assert leased is not None
    leased.status = JobStatus.COMPLETED
    leased.lease.owner = None
    await operations.save(leased)
    assert await operations.acquire("w", 30, utcnow()) is None
    assert await operations.request_cancel(record.id)
    assert not await operations.request_cancel(record.id)
    cleanup = await operations.acquire("w", 30, utcnow())
    assert cleanup is not None and cleanup.cancel_requested


async def test_list_newest_first(operations: OperationDataStore) -> None:
    a, _ = await operations.create_job(job("c1", ["Patient"]), max_active_per_client=5)
    b, _ = await operations.create_job(job("c2", ["Patient"]), max_active_per_client=5)
    assert [r.id for r in await operations.list()] == [b.id, a.id]
    assert [r.id for r in await operations.list(client="c1")] == [a.id]


async def test_secrets_ciphertext_roundtrip(operations: OperationDataStore) -> None:
    await operations.put_secret("s", b"cipher")
    assert await operations.get_secret("s") == b"cipher"
    await operations.delete_secret("s")
    assert await operations.get_secret("s") is None


async def test_pause_and_resume(operations: OperationDataStore) -> None:
    queued, _ = await operations.create_job(job(types=["Patient"]), max_active_per_client=5)
    assert await operations.request_pause(queued.id, True)
    assert await operations.acquire("w", 30, utcnow()) is None  # paused: never acquired
    assert await operations.request_pause(queued.id, False)
    leased = await operations.acquire("w", 30, utcnow())
    assert leased is not None and leased.id == queued.id
    # Running: the request travels by heartbeat; the task then saves status paused.
    assert await operations.request_pause(queued.id, True)
    control = await operations.heartbeat(queued.id, leased.lease.version, 30, utcnow())
    assert control.pause_requested
    leased.status = JobStatus.PAUSED
    leased.lease.owner = None
    await operations.save(leased)
    assert await operations.acquire("w", 30, utcnow()) is None
    assert await operations.request_pause(queued.id, False)
    resumed = await operations.acquire("w", 30, utcnow())
    assert resumed is not None and resumed.lease.version == leased.lease.version + 1


async def test_pause_refused_for_finished_jobs(operations: OperationDataStore) -> None:
    record, _ = await operations.create_job(job(), max_active_per_client=5)
    leased = await operations.acquire("w", 30, utcnow())
    assert leased is not None
    leased.status = JobStatus.COMPLETED
    await operations.save(leased)
    assert not await operations.request_pause(record.id, True)
    assert not await operations.request_pause("missing", True)


async def test_save_resets_restart_count(operations: OperationDataStore) -> None:
    record, _ = await operations.create_job(job(), max_active_per_client=5)
    now = utcnow()
    await operations.acquire("w1", 30, now)
    crashed = await operations.acquire("w2", 30, now + timedelta(seconds=31))
    assert crashed is not None and crashed.restart_count == 1
    crashed.status = JobStatus.FAILED
    await operations.save(crashed)
    stored = await operations.get(record.id)
    assert stored is not None and stored.restart_count == 1
    stored.status, stored.restart_count = JobStatus.QUEUED, 0  # an operator's retry
    await operations.save(stored)
    again = await operations.acquire("w3", 30, now + timedelta(seconds=62))
    assert again is not None and again.restart_count == 0


async def test_a_checkpoint_keeps_the_renewed_lease(operations: OperationDataStore) -> None:
    record, _ = await operations.create_job(job(), max_active_per_client=5)
    start = utcnow()
    leased = await operations.acquire("w", 10, start)
    assert leased is not None
    # The heartbeat renews the lease; the worker's copy still holds the first expiry.
    await operations.heartbeat(record.id, leased.lease.version, 10, start + timedelta(seconds=8))
    leased.last_error = "a checkpoint"
    await operations.save(leased)
    assert await operations.acquire("thief", 10, start + timedelta(seconds=12)) is None
    taken = await operations.acquire("next", 10, start + timedelta(seconds=19))
    assert taken is not None and taken.restart_count == 1


async def test_a_key_is_claimed_once_until_its_claim_expires(
    operations: OperationDataStore,
) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = now + timedelta(minutes=5)
    assert await operations.claim("client-1 jti-1", later, now)
    assert not await operations.claim("client-1 jti-1", later, now + timedelta(minutes=4))
    assert await operations.claim("client-2 jti-1", later, now)  # another key
    # Once expired, the claim is gone (purged) and the key may be claimed again.
    assert await operations.claim("client-1 jti-1", later + timedelta(minutes=5), later)
    assert not await operations.claim("client-1 jti-1", later, later)
