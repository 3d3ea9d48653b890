"""ExportJobTask on the embedded stack: SQLite stores and the filesystem destination."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from datastore.resources import ExportQuery, Page, ResourceStore
from exportsvc.errors import DestinationError, SecretNotFound
from exportsvc.export_task import JobSignals
from exportsvc.records import ExportKind, JobStatus, utcnow
from tests.integration.conftest import Harness


async def test_system_export_rolls_files_and_validates(harness: Harness) -> None:
    await harness.submit()
    record = await harness.run(await harness.acquire())
    assert record.status == JobStatus.COMPLETED
    assert record.total_estimate == record.resources_done > 0
    observation_files = [f for f in record.output if f.type == "Observation"]
    assert len(observation_files) > 3, "max_file_bytes=4096 must roll Observation files"
    assert all(f.committed_bytes <= harness.settings.max_file_bytes for f in record.output)
    assert [f.sequence for f in observation_files] == list(range(1, len(observation_files) + 1))
    report = await harness.validate(record.id)
    assert report.ok, report.render()
    # The secret is gone once the job is done.
    with pytest.raises(SecretNotFound):
        await harness.runtime.secrets.get(record.secret_name or "")


async def test_types_and_since(harness: Harness) -> None:
    since = datetime(2024, 1, 1, tzinfo=UTC)
    await harness.submit(types=["Patient", "Condition"], since=since)
    record = await harness.run(await harness.acquire())
    assert {f.type for f in record.output} <= {"Patient", "Condition"}
    everything = await harness.runtime.resources.count(
        ExportQuery("Condition", record.snapshot_seq)
    )
    selected = sum(f.count for f in record.output if f.type == "Condition")
    assert 0 < selected < everything, "_since must select a real subset"
    report = await harness.validate(record.id)
    assert report.ok, report.render()


async def test_patient_and_group_exports(harness: Harness) -> None:
    await harness.submit(ExportKind.PATIENT)
    patient_level = await harness.run(await harness.acquire())
    types = {f.type for f in patient_level.output}
    assert "Patient" in types and "Observation" in types
    assert not types & {"Practitioner", "Organization"}  # not in the Patient compartment
    assert (await harness.validate(patient_level.id)).ok

    groups = [g async for g in _groups(harness.runtime.resources)]
    group = min(groups, key=lambda g: len(g["member"]))
    await harness.submit(ExportKind.GROUP, group_id=group["id"])
    group_level = await harness.run(await harness.acquire())
    report = await harness.validate(group_level.id)
    assert report.ok, report.render()
    assert report.found["Patient"] == len(group["member"])
    assert group_level.resources_done < patient_level.resources_done


async def _groups(store: ResourceStore) -> Any:
    snap = await store.current_seq()
    page = await store.page(ExportQuery("Group", snap), 0, 100)
    for row in page.rows:
        yield orjson.loads(row.raw)


class _Crash(BaseException):
    """A process dying: nothing after it runs (not an ExportSvcError, not an Exception)."""


async def test_crash_between_commit_and_checkpoint_is_rewritten_once(harness: Harness) -> None:
    await harness.submit()
    first = await harness.acquire()
    operations = harness.runtime.operations
    saves = 0
    original = operations.save

    async def save_then_crash(record: Any) -> None:
        nonlocal saves
        saves += 1
        if saves == 3:  # the files of this checkpoint are committed; its record is not
            raise _Crash()
        await original(record)

    operations.save = save_then_crash  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        await harness.task(first).run()
    operations.save = original  # type: ignore[method-assign]
    checkpointed = await operations.get(first.id)
    assert checkpointed is not None and checkpointed.resources_done > 0

    # The lease expires; the next worker resumes from the last checkpoint.
    resumed = await operations.acquire("w2", 30, utcnow() + timedelta(seconds=31))
    assert resumed is not None and resumed.restart_count == 1
    pages = _count_pages(harness.runtime.resources)
    done = await harness.run(resumed)
    assert done.status == JobStatus.COMPLETED
    report = await harness.validate(done.id)
    assert report.ok, report.render()
    # Resumed, not restarted: only the pages after the last checkpoint are read again.
    assert pages() == done.pages_read - checkpointed.pages_read
    assert checkpointed.pages_read > 0


async def test_writes_during_the_export_do_not_leak_into_it(harness: Harness) -> None:
    await harness.submit(types=["Patient"])
    record = await harness.acquire()
    store = harness.runtime.resources
    snap = await store.current_seq()
    first_page = await store.page(ExportQuery("Patient", snap), 0, 3)
    changed, deleted = first_page.rows[-1].id, first_page.rows[0].id
    original = store.page
    calls = 0

    async def page_and_write(query: ExportQuery, after: int, limit: int) -> Page:
        nonlocal calls
        calls += 1
        if calls == 1:  # mid-export: an update, a deletion and a new Patient
            current = await store.read("Patient", changed)
            assert current is not None
            await store.write([{**current, "gender": "other", "active": False}])
            await store.delete("Patient", deleted)
            await store.write([{"resourceType": "Patient", "id": "born-during-export"}])
        return await original(query, after, limit)

    store.page = page_and_write  # type: ignore[method-assign]
    done = await harness.run(record)
    store.page = original  # type: ignore[method-assign]
    report = await harness.validate(done.id)
    assert report.ok, report.render()
    assert report.found["Patient"] == 12
    lines = []
    async for chunk in _read_all(harness, done):
        lines += chunk.splitlines()
    exported = {orjson.loads(line)["id"]: orjson.loads(line) for line in lines}
    assert "born-during-export" not in exported
    assert deleted in exported
    assert exported[changed]["meta"]["versionId"] == "1"


async def _read_all(harness: Harness, record: Any) -> Any:
    dest = harness.runtime.destinations.for_job(record.id, record.request.container)
    for f in record.output:
        async for chunk in dest.read(f.name):
            yield chunk


def _count_pages(store: ResourceStore) -> Callable[[], int]:
    """Count the pages the store serves from now on."""
    original = store.page
    calls = 0

    async def counting(query: ExportQuery, after: int, limit: int) -> Page:
        nonlocal calls
        calls += 1
        return await original(query, after, limit)

    store.page = counting  # type: ignore[method-assign]
    return lambda: calls


async def test_drain_releases_with_a_checkpoint_and_resumes(harness: Harness) -> None:
    await harness.submit()
    record = await harness.acquire()
    signals = JobSignals()
    store = harness.runtime.resources
    original = store.page
    calls = 0

    async def page_then_drain(query: ExportQuery, after: int, limit: int) -> Page:
        nonlocal calls
        calls += 1
        if calls == 3:
            signals.drain.set()
        return await original(query, after, limit)

    store.page = page_then_drain  # type: ignore[method-assign]
    await harness.task(record, signals).run()
    store.page = original  # type: ignore[method-assign]
    drained = await harness.runtime.operations.get(record.id)
    assert drained is not None
    assert drained.status == JobStatus.QUEUED and drained.failure_count == 0
    assert drained.resources_done > 0 and drained.lease.owner is None
    assert drained.pages_read == calls == 3
    resumed = await harness.acquire()
    assert resumed.restart_count == 0
    pages = _count_pages(store)
    done = await harness.run(resumed)
    assert done.status == JobStatus.COMPLETED
    # Nothing read before the drain is read again.
    assert pages() + calls == done.pages_read
    assert (await harness.validate(done.id)).ok


async def test_cancel_deletes_files_and_secret(harness: Harness) -> None:
    await harness.submit()
    record = await harness.acquire()
    signals = JobSignals()
    store = harness.runtime.resources
    original = store.page

    async def page_then_cancel(query: ExportQuery, after: int, limit: int) -> Page:
        if after > 0:
            signals.cancel.set()
        return await original(query, after, limit)

    store.page = page_then_cancel  # type: ignore[method-assign]
    await harness.task(record, signals).run()
    store.page = original  # type: ignore[method-assign]
    cancelled = await harness.runtime.operations.get(record.id)
    assert cancelled is not None and cancelled.status == JobStatus.CANCELLED
    progressed = await harness.runtime.operations.get(record.id)
    assert progressed is not None and progressed.output, "files were committed before cancel"
    dest = harness.runtime.destinations.for_job(record.id, None)
    for f in progressed.output:
        with pytest.raises(DestinationError):
            [chunk async for chunk in dest.read(f.name)]
    with pytest.raises(SecretNotFound):
        await harness.runtime.secrets.get(record.secret_name or "")


async def test_lenient_problems_are_reported_in_the_error_file(harness: Harness) -> None:
    await harness.submit(types=["Patient"], ignored=["unknown parameter 'foo'; it was ignored"])
    done = await harness.run(await harness.acquire())
    errors = [f for f in done.output if f.role == "error"]
    assert [(f.type, f.count) for f in errors] == [("OperationOutcome", 1)]
    body = b"".join([c async for c in _read_all(harness, done)])
    assert b"unknown parameter 'foo'" in body
    assert (await harness.validate(done.id)).ok
