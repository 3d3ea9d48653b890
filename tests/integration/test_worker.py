"""The worker loop on the embedded stack: acquisition, failures and backoff, drain."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest

from exportsvc.preparer import Preparer
from exportsvc.records import ExportJobRecord, Job, JobStatus, utcnow
from exportsvc.tasks import JobSignals
from exportsvc.worker import Worker, _Running, backoff_seconds
from tests.integration.conftest import Harness


async def wait_for(
    harness: Harness, job_id: str, done: Callable[[ExportJobRecord], bool]
) -> ExportJobRecord:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        record = await harness.runtime.operations.get(job_id)
        assert record is not None
        if done(record):
            return record
        assert asyncio.get_running_loop().time() < deadline, f"job stuck: {record.status}"
        await asyncio.sleep(0.02)


def worker(harness: Harness, **settings: object) -> Worker:
    runtime = harness.runtime
    runtime.settings = runtime.settings.model_copy(update=settings)
    return runtime.worker()


async def test_worker_runs_queued_jobs_to_completion(harness: Harness) -> None:
    w = worker(harness, poll_interval_seconds=0.05)
    running = asyncio.create_task(w.run())
    jobs = [await harness.submit(types=[t]) for t in ("Patient", "Condition", "Encounter")]
    w.wake()
    for job in jobs:
        done = await wait_for(harness, job.id, lambda r: r.status == JobStatus.COMPLETED)
        assert (await harness.validate(done.id)).ok
    w.stop()
    await running


async def test_failures_back_off_then_fail_with_a_reason(harness: Harness) -> None:
    job = await harness.submit(types=["Patient"])
    await harness.runtime.secrets.delete(job.secret_name or "")  # the secret store lost it
    w = worker(
        harness,
        poll_interval_seconds=0.02,
        retry_base_seconds=0.05,
        retry_max_seconds=0.05,
        max_failures=3,
    )
    running = asyncio.create_task(w.run())
    first = await wait_for(harness, job.id, lambda r: r.failure_count >= 1)
    assert first.status in (JobStatus.RETRIABLE, JobStatus.RUNNING, JobStatus.FAILED)
    failed = await wait_for(harness, job.id, lambda r: r.status == JobStatus.FAILED)
    assert failed.failure_count == 3
    assert failed.last_error == "The job's destination secret is missing."
    assert failed.error_status == 500
    w.stop()
    await running


async def test_drain_puts_running_jobs_back_in_the_queue(harness: Harness) -> None:
    harness.runtime.settings = harness.runtime.settings.model_copy(update={"page_size": 1})
    w = worker(harness, poll_interval_seconds=0.02)
    running = asyncio.create_task(w.run())
    job = await harness.submit(types=["Observation"])
    w.wake()
    for _ in range(1000):
        if (await harness.view(job.id)).resources_done > 0:
            break
        await asyncio.sleep(0.01)
    w.stop()
    await asyncio.wait_for(running, 10)
    view = await harness.view(job.id)
    (item,) = view.items
    assert item.status == JobStatus.QUEUED, "400 one-resource pages take far longer"
    assert item.failure_count == 0 and item.lease.owner is None
    assert 0 < view.resources_done < (view.total_estimate or 0)
    assert view.job.status == JobStatus.RUNNING  # the export follows its item
    second = worker(harness, poll_interval_seconds=0.02)
    running = asyncio.create_task(second.run())
    done = await wait_for(harness, job.id, lambda r: r.status == JobStatus.COMPLETED)
    second.stop()
    await running
    assert (await harness.validate(done.id)).ok


async def test_an_import_kick_off_starts_the_preparing_process_only_while_it_runs(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    preparer = Preparer()  # a real one of its own: not the process's shared child
    monkeypatch.setattr("exportsvc.worker.PREPARER", preparer)
    try:
        w = worker(harness, poll_interval_seconds=0.05)
        w.expect_import()  # not running (``serve --no-worker``): no child for nothing
        assert preparer._process is None
        running = asyncio.create_task(w.run())
        await asyncio.sleep(0)
        w.expect_import()
        process = preparer._process
        assert process is not None and process.poll() is None
        w.stop()
        await running
        assert preparer._process is process  # kept for the next import, ended at exit
    finally:
        preparer.close()


def test_backoff_grows_with_jitter(harness: Harness) -> None:
    rng = random.Random(1)
    settings = harness.settings.model_copy(
        update={"retry_base_seconds": 2, "retry_max_seconds": 60}
    )
    delays = [backoff_seconds(n, settings, rng) for n in range(1, 8)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(60, 2 * 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays}) == len(delays)


async def test_a_job_that_keeps_crashing_fails_with_a_reason(harness: Harness) -> None:
    job = await harness.submit(types=["Patient"])
    await harness.plan()
    operations = harness.runtime.operations
    start = utcnow()
    leased = None
    for n in range(3):  # three workers take it in turn and die without a trace
        leased = await operations.acquire(f"dies-{n}", 1, start + timedelta(seconds=2 * n))
        assert leased is not None
    assert leased is not None and leased.restart_count == 2
    w = worker(harness, max_restarts=1)
    await w._process(leased, JobSignals())
    view = await harness.view(job.id)
    (item,) = view.items
    assert item.status == JobStatus.FAILED and view.job.status == JobStatus.FAILED
    assert "interrupted 2 times" in (item.last_error or "")
    assert "avoid looping forever" in (item.last_error or "")


async def _heartbeat_after(
    harness: Harness, change: Callable[[Job], Awaitable[None]]
) -> JobSignals:
    """One heartbeat of a worker holding a job's lease, after ``change`` to the stored
    job, and before the task that holds it says anything (``signals.released`` unset)."""
    await harness.submit(types=["Patient"])
    record = await harness.acquire("the-worker")
    await change(record)
    w = worker(harness)
    signals = JobSignals()
    idle = asyncio.create_task(asyncio.sleep(0))
    running = _Running(task=idle, signals=signals, record=record)
    running.poke.set()
    await asyncio.wait_for(w._heartbeat(running), 10)
    await idle
    return signals


async def test_a_lease_the_task_gave_back_is_not_reported_lost(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The task's own release (same lease version, no owner) can reach the store before
    the task sets ``released``: the heartbeat it wakes stops without calling it lost."""

    async def release(record: Job) -> None:
        stored = await harness.runtime.operations.get(record.id)
        assert stored is not None
        stored.lease.owner, stored.lease.expires_at = None, None
        await harness.runtime.operations.save(stored)

    with caplog.at_level(logging.INFO, logger="exportsvc.worker"):
        signals = await _heartbeat_after(harness, release)
    assert signals.lost.is_set()
    assert "job.lease_lost" not in [r.getMessage() for r in caplog.records]


async def test_a_lease_another_worker_took_is_reported_lost(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    async def take_over(record: Job) -> None:
        later = utcnow() + timedelta(minutes=5)  # past the lease: as after a crash
        taken = await harness.runtime.operations.acquire("another-worker", 30, later)
        assert taken is not None and taken.id == record.id
        assert taken.lease.version > record.lease.version

    with caplog.at_level(logging.INFO, logger="exportsvc.worker"):
        signals = await _heartbeat_after(harness, take_over)
    assert signals.lost.is_set()
    assert "job.lease_lost" in [r.getMessage() for r in caplog.records]


async def _taken_over(harness: Harness) -> tuple[ExportJobRecord, Job, Job]:
    """A job "the-worker" leased, then "another-worker" took past that lease (as after a
    stall): (the job, the first worker's record, the new owner's)."""
    job = await harness.submit(types=["Patient"])
    record = await harness.acquire("the-worker")
    later = utcnow() + timedelta(minutes=5)  # past the lease: as after a stall
    taken = await harness.runtime.operations.acquire("another-worker", 30, later)
    assert taken is not None and taken.id == record.id == job.id
    return job, record, taken


async def _the_new_owners(harness: Harness, taken: Job) -> Job:
    """The stored job, asserted still running under the new owner's lease."""
    stored = await harness.runtime.operations.get(taken.id)
    assert stored is not None
    assert (stored.status, stored.lease.owner) == (JobStatus.RUNNING, "another-worker")
    assert stored.lease.version == taken.lease.version
    return stored


async def test_a_task_that_fails_after_its_lease_was_taken_counts_nothing(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled worker's task often fails before its heartbeat notices the new owner
    (its next commit meets the new owner's ETag). That failure is not the job's: the
    stored job, the new owner's, is untouched, and the worker says its lease was lost."""
    job, record, taken = await _taken_over(harness)
    await harness.runtime.secrets.delete(job.secret_name or "")  # so the task fails
    signals = JobSignals()
    with caplog.at_level(logging.INFO, logger="exportsvc.worker"):
        await worker(harness)._process(record, signals)
    stored = await _the_new_owners(harness, taken)
    assert stored.failure_count == 0 and stored.last_error is None
    said = [r.getMessage() for r in caplog.records]
    assert said.count("job.lease_lost") == 1, said
    assert "job.retriable" not in said and signals.lost.is_set()


async def test_a_release_past_the_drain_grace_leaves_a_taken_job_alone(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the drain grace a worker hands its job back to the queue, unless another
    worker has taken it meanwhile: then it queues nothing over the new owner's lease and
    says its lease was lost (no ``job.released``)."""
    _, record, taken = await _taken_over(harness)
    signals = JobSignals()
    with caplog.at_level(logging.INFO, logger="exportsvc.worker"):
        await worker(harness)._release_after_cancel(record, signals)
    await _the_new_owners(harness, taken)
    said = [r.getMessage() for r in caplog.records]
    assert said.count("job.lease_lost") == 1 and "job.released" not in said, said
    assert signals.lost.is_set()
