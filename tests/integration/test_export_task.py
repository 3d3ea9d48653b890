"""The export tasks (planning, work items) on SQLite or PostgreSQL, filesystem or Azurite."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from datastore.resources import ExportQuery, Page, ResourceStore
from exportsvc.errors import DestinationError, SecretNotFound
from exportsvc.export_task import JobSignals
from exportsvc.fhir.compartment import patient_ids
from exportsvc.records import ExportItemRecord, ExportJobRecord, ExportKind, JobStatus, utcnow
from exportsvc.validator import validate_export
from tests.integration.conftest import Harness


async def test_system_export_rolls_files_and_validates(harness: Harness) -> None:
    job = await harness.submit()
    items = await harness.plan()
    assert len(items) == len(await harness.runtime.resources.types(job.snapshot_seq))
    view = await harness.run_all(job.id)
    assert view.job.status == JobStatus.COMPLETED
    assert view.total_estimate == view.resources_done > 0
    observation_files = [f for f in view.files if f.type == "Observation"]
    assert len(observation_files) > 3, "max_file_bytes=4096 must roll Observation files"
    assert all(f.committed_bytes <= harness.settings.max_file_bytes for f in view.files)
    assert [f.name for f in observation_files] == [
        f"Observation-{n:04d}.ndjson" for n in range(1, len(observation_files) + 1)
    ]
    report = await harness.validate(job.id)
    assert report.ok, report.render()
    for record in (view.job, *view.items):  # every secret is gone once the job is done
        with pytest.raises(SecretNotFound):
            await harness.runtime.secrets.get(record.secret_name or "")


async def test_large_types_fan_out_across_workers(harness: Harness) -> None:
    harness.runtime.settings = harness.settings.model_copy(update={"export_item_resources": 60})
    job = await harness.submit(types=["Observation", "Patient"])
    items = await harness.plan()
    observation = [i for i in items if i.type == "Observation"]
    assert len(observation) > 3 and [i.scope for i in items if i.type == "Patient"] == ["Patient"]
    assert observation[0].scope == "Observation.000"
    ranges = sorted((i.seq_after, i.seq_max) for i in observation)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # no gap, no overlap

    async def worker(name: str) -> int:
        done = 0
        while (item := await harness.runtime.operations.acquire(name, 30, utcnow())) is not None:
            await harness.task(item).run()
            done += 1
        return done

    counts = await asyncio.gather(worker("w1"), worker("w2"))
    assert sum(counts) == len(items) and min(counts) > 0, "both workers took items"
    view = await harness.view(job.id)
    assert view.job.status == JobStatus.COMPLETED
    names = [f.name for f in view.files]
    assert len(names) == len(set(names)) and "Observation.001-0001.ndjson" in names
    report = await harness.validate(job.id)
    assert report.ok, report.render()


async def test_types_and_since(harness: Harness) -> None:
    since = datetime(2024, 1, 1, tzinfo=UTC)
    job = await harness.submit(types=["Patient", "Condition"], since=since)
    view = await harness.run_all(job.id)
    assert {f.type for f in view.files} <= {"Patient", "Condition"}
    everything = await harness.runtime.resources.count(ExportQuery("Condition", job.snapshot_seq))
    selected = sum(f.count for f in view.files if f.type == "Condition")
    assert 0 < selected < everything, "_since must select a real subset"
    report = await harness.validate(job.id)
    assert report.ok, report.render()


async def test_patient_and_group_exports(harness: Harness) -> None:
    patient_job = await harness.submit(ExportKind.PATIENT)
    patient_level = await harness.run_all(patient_job.id)
    types = {f.type for f in patient_level.files}
    assert "Patient" in types and "Observation" in types
    assert not types & {"Practitioner", "Organization"}  # not in the Patient compartment
    assert (await harness.validate(patient_job.id)).ok

    groups = [g async for g in _groups(harness.runtime.resources)]
    group = min(groups, key=lambda g: len(g["member"]))
    group_job = await harness.submit(ExportKind.GROUP, group_id=group["id"])
    group_level = await harness.run_all(group_job.id)
    report = await harness.validate(group_job.id)
    assert report.ok, report.render()
    assert report.found["Patient"] == len(group["member"])
    assert group_level.resources_done < patient_level.resources_done


async def _groups(store: ResourceStore) -> Any:
    snap = await store.current_seq()
    page = await store.page(ExportQuery("Group", snap), 0, 100)
    for raw in page.raws:
        yield orjson.loads(raw)


class _Crash(BaseException):
    """A process dying: nothing after it runs (not an ExportSvcError, not an Exception)."""


async def one_item(
    harness: Harness, kind: ExportKind = ExportKind.SYSTEM, **fields: Any
) -> tuple[str, ExportItemRecord]:
    """An export of a single work item, planned; the item leased."""
    job = await harness.submit(kind, **fields)
    items = await harness.plan()
    assert len(items) == 1
    item = await harness.acquire()
    assert isinstance(item, ExportItemRecord)
    return job.id, item


async def test_crash_between_commit_and_checkpoint_is_rewritten_once(harness: Harness) -> None:
    job_id, first = await one_item(harness, types=["Observation"])
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
    assert isinstance(checkpointed, ExportItemRecord) and checkpointed.resources_done > 0

    # The lease expires; the next worker resumes from the last checkpoint.
    resumed = await operations.acquire("w2", 30, utcnow() + timedelta(seconds=31))
    assert resumed is not None and resumed.restart_count == 1
    pages = _count_pages(harness.runtime.resources)
    done = await harness.run(resumed)
    assert isinstance(done, ExportItemRecord) and done.status == JobStatus.COMPLETED
    assert (await harness.view(job_id)).job.status == JobStatus.COMPLETED
    report = await harness.validate(job_id)
    assert report.ok, report.render()
    # Resumed, not restarted: only the pages after the last checkpoint are read again.
    assert pages() == done.pages_read - checkpointed.pages_read
    assert checkpointed.pages_read > 0


async def test_writes_during_the_export_do_not_leak_into_it(harness: Harness) -> None:
    job_id, item = await one_item(harness, types=["Patient"])
    store = harness.runtime.resources
    first_page = await store.page(ExportQuery("Patient", item.snapshot_seq), 0, 3)
    first = [orjson.loads(raw)["id"] for raw in first_page.raws]
    changed, deleted = first[-1], first[0]
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
    await harness.run(item)
    store.page = original  # type: ignore[method-assign]
    report = await harness.validate(job_id)
    assert report.ok, report.render()
    assert report.found["Patient"] == 12
    lines = []
    async for chunk in _read_all(harness, job_id):
        lines += chunk.splitlines()
    exported = {orjson.loads(line)["id"]: orjson.loads(line) for line in lines}
    assert "born-during-export" not in exported
    assert deleted in exported
    assert exported[changed]["meta"]["versionId"] == "1"


async def _read_all(harness: Harness, job_id: str) -> Any:
    view = await harness.view(job_id)
    dest = harness.runtime.destinations.for_job(job_id, None)
    for f in view.files:
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


def _reconciling(harness: Harness) -> list[tuple[str, str | None, bool]]:
    """Note each reconcile (``restore``) and each end (``finalize``, with or without its
    sweep) of the destinations the tasks create from now on: (what, scope, sweep)."""
    factory = harness.runtime.destinations
    create = factory.create
    calls: list[tuple[str, str | None, bool]] = []

    def noting(job_id: str, secret: Any, scope: str | None = None) -> Any:
        dest = create(job_id, secret, scope)
        restore, finalize = dest.restore, dest.finalize

        async def restoring(files: Any) -> None:
            calls.append(("restore", scope, True))
            await restore(files)

        async def finalizing(files: Any, *, sweep: bool = True) -> None:
            calls.append(("finalize", scope, sweep))
            await finalize(files, sweep=sweep)

        dest.restore, dest.finalize = restoring, finalizing  # type: ignore[method-assign]
        return dest

    factory.create = noting  # type: ignore[method-assign]
    return calls


async def test_a_first_lease_neither_reconciles_nor_sweeps_and_a_resumed_one_does(
    harness: Harness,
) -> None:
    calls = _reconciling(harness)
    job_id, item = await one_item(harness, types=["Observation"])
    assert item.lease.version == 1
    drained = await harness.run_draining(item, "page", 3)
    assert drained.status == JobStatus.QUEUED
    assert calls == [], "nothing but this run can have written under a first lease"
    resumed = await harness.acquire()
    assert resumed.id == item.id and resumed.lease.version == 2
    done = await harness.run(resumed)
    assert done.status == JobStatus.COMPLETED
    assert calls == [("restore", "Observation", True), ("finalize", "Observation", True)]
    report = await harness.validate(job_id)
    assert report.ok, report.render()


async def test_a_first_lease_ends_without_a_sweep(harness: Harness) -> None:
    calls = _reconciling(harness)
    job_id, item = await one_item(harness, types=["Patient"])
    done = await harness.run(item)
    assert done.status == JobStatus.COMPLETED
    assert calls == [("finalize", "Patient", False)]
    report = await harness.validate(job_id)
    assert report.ok, report.render()


async def test_drain_releases_with_a_checkpoint_and_resumes(harness: Harness) -> None:
    job_id, item = await one_item(harness, types=["Observation"])
    store = harness.runtime.resources
    drained = await harness.run_draining(item, "page", 3)
    assert isinstance(drained, ExportItemRecord)
    assert drained.status == JobStatus.QUEUED and drained.failure_count == 0
    assert drained.resources_done > 0 and drained.lease.owner is None
    # The page read ahead when the drain came was dropped unwritten: the checkpoint
    # covers the pages before it.
    assert drained.pages_read == 2
    resumed = await harness.acquire()
    assert resumed.id == item.id and resumed.restart_count == 0
    pages = _count_pages(store)
    done = await harness.run(resumed)
    assert isinstance(done, ExportItemRecord) and done.status == JobStatus.COMPLETED
    # Nothing written before the drain is read again; the dropped page is.
    assert pages() + drained.pages_read == done.pages_read
    assert (await harness.validate(job_id)).ok


async def test_cancel_deletes_files_and_secret(harness: Harness) -> None:
    job_id, item = await one_item(harness, types=["Observation"])
    signals = JobSignals()
    store = harness.runtime.resources
    original = store.page

    async def page_then_cancel(query: ExportQuery, after: int, limit: int) -> Page:
        if after > item.seq_after:
            signals.cancel.set()
        return await original(query, after, limit)

    store.page = page_then_cancel  # type: ignore[method-assign]
    await harness.task(item, signals).run()
    store.page = original  # type: ignore[method-assign]
    cancelled = await harness.runtime.operations.get(item.id)
    assert cancelled is not None and cancelled.status == JobStatus.CANCELLED
    assert cancelled.output, "files were committed before the cancel"
    assert (await harness.view(job_id)).job.status == JobStatus.CANCELLED
    dest = harness.runtime.destinations.for_job(job_id, None)
    for f in cancelled.output:
        with pytest.raises(DestinationError):
            [chunk async for chunk in dest.read(f.name)]
    with pytest.raises(SecretNotFound):
        await harness.runtime.secrets.get(item.secret_name or "")


async def test_lenient_problems_are_reported_in_the_error_file(harness: Harness) -> None:
    job = await harness.submit(
        types=["Patient"], ignored=["unknown parameter 'foo'; it was ignored"]
    )
    view = await harness.run_all(job.id)
    errors = [f for f in view.files if f.role == "error"]
    assert [(f.type, f.count) for f in errors] == [("OperationOutcome", 1)]
    body = b"".join([c async for c in _read_all(harness, job.id)])
    assert b"unknown parameter 'foo'" in body
    assert (await harness.validate(job.id)).ok


async def test_an_export_of_nothing_completes(harness: Harness) -> None:
    job = await harness.submit(types=["Specimen"])
    view = await harness.run_all(job.id)
    assert view.job.status == JobStatus.COMPLETED and view.items == [] and view.files == []
    assert (await harness.validate(job.id)).ok


async def test_the_validator_checks_counts_and_file_sizes(harness: Harness) -> None:
    job = await harness.submit(types=["Patient"], ignored=["unknown parameter 'foo'"])
    view = await harness.run_all(job.id)
    report = await harness.validate(job.id)
    assert report.ok, report.render()
    dest = harness.runtime.destinations.for_job(job.id, None)
    for f in view.files:  # the recorded size is the file's: what the manifest says
        assert f.committed_bytes == sum([len(c) async for c in dest.read(f.name)]) > 0
    error = next(f for f in view.files if f.role == "error")
    error.committed_bytes += 1
    error.count += 1
    assert isinstance(view.job, ExportJobRecord)
    lied = await validate_export(view, harness.runtime.resources, dest)
    assert lied.problem_count == 2
    assert "fileSize is" in lied.render() and "counts 2 lines, the file has 1" in lied.render()


async def _ids(store: ResourceStore, type_: str, limit: int = 1000) -> list[str]:
    page = await store.page(ExportQuery(type_, await store.current_seq()), 0, limit)
    return [orjson.loads(raw)["id"] for raw in page.raws]


async def _stamp(store: ResourceStore, type_: str, id_: str) -> datetime:
    stamps = [v.last_updated async for v in store.scan_versions() if (v.type, v.id) == (type_, id_)]
    return datetime.fromtimestamp(stamps[-1] / 1_000_000, UTC)


async def _deleted_urls(harness: Harness, job_id: str) -> list[str]:
    view = await harness.view(job_id)
    dest = harness.runtime.destinations.for_job(job_id, None)
    urls = []
    for f in view.files:
        if f.role == "deleted":
            assert f.type == "Bundle"
            body = b"".join([c async for c in dest.read(f.name)])
            for line in body.splitlines():
                bundle = orjson.loads(line)
                assert bundle["type"] == "transaction"
                assert [e["request"]["method"] for e in bundle["entry"]] == ["DELETE"]
                urls.append(bundle["entry"][0]["request"]["url"])
    return urls


async def test_since_lists_deletions_in_the_window_and_never_in_output(harness: Harness) -> None:
    store = harness.runtime.resources
    observations, conditions = await _ids(store, "Observation"), await _ids(store, "Condition")
    await store.delete("Observation", observations[0])  # before _since: not listed
    since = await _stamp(store, "Observation", observations[0])
    for id_ in observations[1:4]:
        await store.delete("Observation", id_)
    await store.delete("Condition", conditions[0])
    back = await store.read("Condition", conditions[1])
    assert back is not None
    await store.delete("Condition", conditions[1])
    await store.write([back])  # deleted and re-created in the window: output only
    job = await harness.submit(types=["Observation", "Condition", "Patient"], since=since)
    await store.delete("Observation", observations[4])  # after the kick-off: not listed
    view = await harness.run_all(job.id)
    assert view.job.status == JobStatus.COMPLETED
    assert sorted(await _deleted_urls(harness, job.id)) == sorted(
        [f"Observation/{i}" for i in observations[1:4]] + [f"Condition/{conditions[0]}"]
    )
    deleted_items = [i for i in view.exports if i.content == "deleted"]
    assert sorted(i.type for i in deleted_items) == ["Condition", "Observation"]
    output = [f for f in view.files if f.role == "output"]
    assert [(f.type, f.count) for f in output] == [("Condition", 1)]
    report = await harness.validate(job.id)
    assert report.ok, report.render()
    assert report.found["Observation (deleted)"] == 3


async def test_deletions_at_group_level_follow_the_deleted_versions_compartment(
    harness: Harness,
) -> None:
    store = harness.runtime.resources
    groups = [g async for g in _groups(store)]
    group = min(groups, key=lambda g: len(g["member"]))
    members = {m["entity"]["reference"].split("/")[1] for m in group["member"]}
    since = datetime.now(UTC)
    by_patient: dict[bool, list[str]] = {True: [], False: []}
    snap = await store.current_seq()
    for raw in (await store.page(ExportQuery("Observation", snap), 0, 1000)).raws:
        observation = orjson.loads(raw)
        subject = observation["subject"]["reference"].split("/")[1]
        by_patient[subject in members].append(observation["id"])
    inside, outside = by_patient[True][:2], by_patient[False][:2]
    for id_ in inside + outside:
        await store.delete("Observation", id_)
    job = await harness.submit(ExportKind.GROUP, group_id=group["id"], since=since)
    view = await harness.run_all(job.id)
    assert sorted(await _deleted_urls(harness, job.id)) == sorted(
        f"Observation/{i}" for i in inside
    )
    assert not [f for f in view.files if f.role == "output"]  # nothing changed since
    report = await harness.validate(job.id)
    assert report.ok, report.render()


async def test_a_drained_deletions_item_resumes_from_its_checkpoint(harness: Harness) -> None:
    harness.runtime.settings = harness.settings.model_copy(
        update={"page_size": 2, "commit_every_pages": 1}
    )
    store = harness.runtime.resources
    since = datetime.now(UTC)
    for id_ in (await _ids(store, "Observation"))[:7]:
        await store.delete("Observation", id_)
    job_id, item = await one_item(harness, types=["Observation"], since=since)
    assert item.content == "deleted"
    # Drained while the second page is written (the third is read ahead).
    drained = await harness.run_draining(item, "deletions", 3)
    assert isinstance(drained, ExportItemRecord) and drained.status == JobStatus.QUEUED
    assert drained.resources_done == 4 and drained.output[0].count == 4
    resumed = await harness.acquire()
    done = await harness.run(resumed)
    assert isinstance(done, ExportItemRecord) and done.resources_done == 7
    assert len(await _deleted_urls(harness, job_id)) == 7
    report = await harness.validate(job_id)
    assert report.ok, report.render()


async def _current(store: ResourceStore, type_: str) -> list[dict[str, Any]]:
    page = await store.page(ExportQuery(type_, await store.current_seq()), 0, 10_000)
    return [orjson.loads(raw) for raw in page.raws]


async def _exported_ids(harness: Harness, job_id: str, type_: str) -> list[str]:
    view = await harness.view(job_id)
    dest = harness.runtime.destinations.for_job(job_id, None)
    ids = []
    for f in view.files:
        if f.type == type_ and f.role == "output":
            body = b"".join([c async for c in dest.read(f.name)])
            ids += [orjson.loads(line)["id"] for line in body.splitlines()]
    return ids


def _targets(provenance: dict[str, Any]) -> set[str]:
    return {t["reference"] for t in provenance["target"]}


@pytest.mark.parametrize("value", ["RelevantProvenanceResources", "LatestProvenanceResources"])
async def test_associated_provenance_of_the_exported_resources(
    harness: Harness, value: str
) -> None:
    store = harness.runtime.resources
    provenance = await _current(store, "Provenance")
    encounters = await _current(store, "Encounter")
    since = datetime(2024, 1, 1, tzinfo=UTC)
    exported = {
        f"Encounter/{e['id']}" for e in encounters if e["meta"]["lastUpdated"] >= "2024-01-01"
    }
    assert 0 < len(exported) < len(encounters)
    # In Python: the Provenance naming an exported Encounter; Latest: the most recent one
    # (here `recorded` decides) of each exported Encounter.
    relevant = {p["id"] for p in provenance if _targets(p) & exported}
    latest = {
        max((p for p in provenance if e in _targets(p)), key=lambda p: p["recorded"])["id"]
        for e in exported
    }
    assert latest < relevant, "the seed has amended records: Latest is a real subset"
    job = await harness.submit(types=["Encounter", "Provenance"], since=since, associated=[value])
    view = await harness.run_all(job.id)
    assert view.job.status == JobStatus.COMPLETED
    got = await _exported_ids(harness, job.id, "Provenance")
    assert sorted(got) == sorted(relevant if value.startswith("Relevant") else latest)
    assert sorted(await _exported_ids(harness, job.id, "Encounter")) == sorted(
        e.split("/")[1] for e in exported
    )
    report = await harness.validate(job.id)
    assert report.ok, report.render()

    # Observations have no Provenance here: an export of them adds none.
    job = await harness.submit(types=["Observation"], associated=[value])
    view = await harness.run_all(job.id)
    assert {f.type for f in view.files} == {"Observation"}
    assert (await harness.validate(job.id)).ok


async def test_associated_provenance_at_group_level_and_after_a_drain(harness: Harness) -> None:
    harness.runtime.settings = harness.settings.model_copy(
        update={"page_size": 2, "commit_every_pages": 1}
    )
    store = harness.runtime.resources
    group = min([g async for g in _groups(store)], key=lambda g: len(g["member"]))
    members = {m["entity"]["reference"] for m in group["member"]}
    provenance = await _current(store, "Provenance")
    mine = [p for p in provenance if _targets(p) & members]
    latest = {max(mine, key=lambda p: p["recorded"])["id"]} if len(members) == 1 else None
    job = await harness.submit(
        ExportKind.GROUP,
        group_id=group["id"],
        types=["Patient"],
        associated=["LatestProvenanceResources"],
    )
    items = await harness.plan()
    assert sorted((i.type, i.content) for i in items) == [
        ("Patient", "resources"),
        ("Provenance", "provenance"),
    ]
    first, second = await harness.acquire(), await harness.acquire()
    assert isinstance(first, ExportItemRecord) and isinstance(second, ExportItemRecord)
    patients, item = (first, second) if first.content == "resources" else (second, first)
    await harness.run(patients)
    assert item.content == "provenance"
    prepare_calls = len(provenance) // 2 + 1  # the read-only pass of Latest
    # Drained at the third page after that pass (a page read ahead).
    drained = await harness.run_draining(item, "page", prepare_calls + 3)
    assert isinstance(drained, ExportItemRecord) and drained.status == JobStatus.QUEUED
    assert drained.pages_read == 2
    done = await harness.run(await harness.acquire())
    assert done.status == JobStatus.COMPLETED
    got = await _exported_ids(harness, job.id, "Provenance")
    # Each member's Patient record: its most recent Provenance, once.
    assert len(got) == len(set(got)) == len(members)
    if latest is not None:
        assert set(got) == latest
    report = await harness.validate(job.id)
    assert report.ok, report.render()


async def _lines_of(harness: Harness, job_id: str, name: str) -> list[dict[str, Any]]:
    dest = harness.runtime.destinations.for_job(job_id, None)
    body = b"".join([c async for c in dest.read(name)])
    return [orjson.loads(line) for line in body.splitlines()]


def _header_of(line: dict[str, Any]) -> str | None:
    if line["resourceType"] != "Parameters":
        return None
    reference: str = line["parameter"][0]["valueReference"]["reference"]
    return reference.split("/")[1]


async def test_organize_output_by_patient(harness: Harness) -> None:
    store = harness.runtime.resources
    job = await harness.submit(organize_by="Patient")
    items = await harness.plan()
    assert [(i.content, i.scope) for i in items] == [("organized", "Patient.blocks")]
    view = await harness.run_all(job.id)
    files = [f for f in view.files if f.role == "output"]
    assert len(files) > 3 and any(f.continues_in for f in files), "max_file_bytes=4096 splits"
    blocks: dict[str, list[str]] = {}
    current = None
    for f in files:
        lines = await _lines_of(harness, job.id, f.name)
        assert _header_of(lines[0]) is not None, "every file starts with a block header"
        for line in lines:
            patient = _header_of(line)
            if patient is not None:
                current = patient
                blocks.setdefault(patient, [])
            else:
                assert current is not None
                blocks[current].append(f"{line['resourceType']}/{line['id']}")
    # In Python: each Patient's block holds its compartment (the seed's clinical resources,
    # its Provenance, the Groups it is a member of), its Patient first.
    expected: dict[str, set[str]] = {}
    snap = job.snapshot_seq
    for type_ in await store.types(snap):
        for raw in (await store.page(ExportQuery(type_, snap), 0, 10_000)).raws:
            resource = orjson.loads(raw)
            for patient in patient_ids(resource):
                expected.setdefault(patient, set()).add(f"{type_}/{resource['id']}")
    assert {p: set(b) for p, b in blocks.items()} == expected
    assert all(b[0] == f"Patient/{p}" for p, b in blocks.items())
    assert not any(
        r.startswith(("Organization/", "Practitioner/")) for b in blocks.values() for r in b
    )
    report = await harness.validate(job.id)
    assert report.ok, report.render()
    # The validator sees a split block the manifest does not tie together.
    split = next(f for f in view.files if f.continues_in)
    split.continues_in = None
    dest = harness.runtime.destinations.for_job(job.id, None)
    broken = await validate_export(view, store, dest)
    assert not broken.ok and "a second block of Patient/" in broken.render()


async def test_organized_blocks_resume_after_a_drain(harness: Harness) -> None:
    harness.runtime.settings = harness.settings.model_copy(
        update={"page_size": 20, "commit_every_pages": 1}
    )
    store = harness.runtime.resources
    group = max([g async for g in _groups(store)], key=lambda g: len(g["member"]))
    job_id, item = await one_item(
        harness,
        kind=ExportKind.GROUP,
        group_id=group["id"],
        organize_by="Patient",
        types=["Patient", "Observation", "Condition"],
    )
    drained = await harness.run_draining(item, "blocks", 5)
    assert isinstance(drained, ExportItemRecord) and drained.status == JobStatus.QUEUED
    assert drained.after_patient and drained.pages_read == 5
    done = await harness.run(await harness.acquire())
    assert done.status == JobStatus.COMPLETED
    view = await harness.view(job_id)
    patients = set()
    for f in view.files:
        patients |= {
            p for line in await _lines_of(harness, job_id, f.name) if (p := _header_of(line))
        }
    members = {m["entity"]["reference"].split("/")[1] for m in group["member"]}
    assert patients == members
    report = await harness.validate(job_id)
    assert report.ok, report.render()
