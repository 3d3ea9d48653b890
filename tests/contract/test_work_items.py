"""Jobs with work items (imports and their batches), and writes with a checkpoint."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import orjson
import pytest

from datastore.operations import OperationDataStore
from datastore.resources import Origin, ResourceStore, WriteGroup, WriteResult
from datastore.versioning import Stamp, first_version
from exportsvc.errors import LeaseLost
from exportsvc.records import (
    ExportJobRecord,
    ExportKind,
    ExportRequest,
    ImportBatchRecord,
    ImportInput,
    ImportJobRecord,
    ImportRequest,
    JobRecord,
    JobStatus,
    utcnow,
)


def an_import(batches: int = 3, client: str = "c1") -> tuple[ImportJobRecord, list[Any]]:
    item = ImportInput(url="file:///data/in.ndjson", size=300, etag="e1")
    request = ImportRequest(inputs=[item], request_url="http://x/$import")
    parent = ImportJobRecord(
        id=uuid.uuid4().hex,
        client=client,
        fingerprint=request.fingerprint(),
        request=request,
        transaction_time=utcnow(),
        status=JobStatus.RUNNING,
        batch_count=batches,
    )
    children = [
        ImportBatchRecord(
            id=uuid.uuid4().hex,
            client=client,
            parent_id=parent.id,
            input_index=0,
            input=item,
            start=n * 100,
            end=(n + 1) * 100,
            offset=n * 100,
        )
        for n in range(batches)
    ]
    return parent, children


async def finish(operations: OperationDataStore, status: JobStatus) -> JobRecord:
    leased = await operations.acquire("w", 30, utcnow())
    assert leased is not None and leased.kind == "import-batch"
    leased.status = status
    leased.lease.owner = None
    await operations.save(leased)
    assert leased.parent_id is not None
    await operations.settle(leased.parent_id)
    return leased


async def test_parent_and_batches_in_one_go(operations: OperationDataStore) -> None:
    parent, children = an_import()
    stored, created = await operations.create_job(parent, children, max_active_per_client=5)
    assert created and isinstance(stored, ImportJobRecord)
    assert [c.id for c in await operations.children(parent.id)] == [c.id for c in children]
    again, created = await operations.create_job(*an_import(), max_active_per_client=5)
    assert not created and again.id == parent.id  # the same request: the same job
    assert [r.id for r in await operations.list()] == [parent.id]  # jobs, not work items


async def test_batches_are_leased_parents_never(operations: OperationDataStore) -> None:
    parent, children = an_import(batches=2)
    await operations.create_job(parent, children, max_active_per_client=5)
    leased = [await operations.acquire(f"w{i}", 30, utcnow()) for i in range(2)]
    assert {r.id for r in leased if r is not None} == {c.id for c in children}
    assert await operations.acquire("w", 30, utcnow()) is None


async def test_settle_follows_the_batches(operations: OperationDataStore) -> None:
    parent, children = an_import(batches=2)
    await operations.create_job(parent, children, max_active_per_client=5)
    await finish(operations, JobStatus.COMPLETED)
    assert (await operations.get(parent.id)).status == JobStatus.RUNNING  # type: ignore[union-attr]
    await finish(operations, JobStatus.COMPLETED)
    assert (await operations.get(parent.id)).status == JobStatus.COMPLETED  # type: ignore[union-attr]

    failing, items = an_import(batches=2, client="c2")
    await operations.create_job(failing, items, max_active_per_client=5)
    await finish(operations, JobStatus.FAILED)
    await finish(operations, JobStatus.COMPLETED)
    assert (await operations.get(failing.id)).status == JobStatus.FAILED  # type: ignore[union-attr]
    # Finished imports stop counting against the client's limit.
    _, created = await operations.create_job(*an_import(client="c1"), max_active_per_client=1)
    assert created


async def test_cancel_and_pause_reach_every_batch(operations: OperationDataStore) -> None:
    parent, children = an_import(batches=2)
    await operations.create_job(parent, children, max_active_per_client=5)
    assert await operations.request_pause(parent.id, True)
    assert await operations.acquire("w", 30, utcnow()) is None
    assert await operations.request_pause(parent.id, False)
    leased = await operations.acquire("w", 30, utcnow())
    assert leased is not None
    assert await operations.request_cancel(parent.id)
    control = await operations.heartbeat(leased.id, leased.lease.version, 30, utcnow())
    assert control.cancel_requested
    for child in await operations.children(parent.id):
        assert child.cancel_requested and not child.visible
    other = await operations.acquire("w2", 30, utcnow() + timedelta(seconds=1))
    assert other is not None and other.cancel_requested  # the queued one, for cleanup


def patient(id_: str, family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": id_, "name": [{"family": family}]}


Write = Callable[..., Awaitable[WriteResult]]


@pytest.fixture(params=["write", "write_versions", "import"])
def write(
    request: pytest.FixtureRequest, stores: tuple[OperationDataStore, ResourceStore]
) -> Write:
    """One write, as resources (``write``), as versions stamped beforehand
    (``write_versions``), or as an import prepares them, with a pending stamp and, for a
    store that compares by it, the content hash (and the key hash, for one that finds
    resources by it), in a write that may share its transaction with others: the same
    rules every way."""
    _, resources = stores
    if request.param == "write":
        return resources.write

    async def write_versions(batch: Sequence[Mapping[str, Any]], **kwargs: Any) -> WriteResult:
        stamp = Stamp.at(utcnow())
        return await resources.write_versions([first_version(r, stamp) for r in batch], **kwargs)

    async def write_as_imported(batch: Sequence[Mapping[str, Any]], **kwargs: Any) -> WriteResult:
        pending, hashed, keyed = Stamp.pending(), resources.hashes_content, resources.hashes_keys
        lines = [orjson.loads(orjson.dumps(r)) for r in batch]  # parsed, as an import does
        versions = [first_version(r, pending, hashed=hashed, keyed=keyed) for r in lines]
        told: list[str] = []
        group = WriteGroup(("batch", 1), lambda: told.append("committed"))
        try:
            written = await resources.write_versions(
                versions, restamp=pending, group=group, **kwargs
            )
        except BaseException:
            await resources.commit_grouped(group.owner)
            assert not told, "a write that failed was said to be committed"
            raise
        await resources.commit_grouped(group.owner)  # as a batch's last checkpoint does
        assert told == ["committed"]  # by the time the call that committed it returns
        return written

    return write_versions if request.param == "write_versions" else write_as_imported


async def test_a_later_line_always_wins(
    stores: tuple[OperationDataStore, ResourceStore], write: Write
) -> None:
    _, resources = stores
    # Lines of one import at positions 10, 20, 30, written in the worst order.
    await write([patient("a", "X")], origin=Origin("imp", [30]))
    await write([patient("a", "Y")], origin=Origin("imp", [20]))
    await write([patient("a", "X")], origin=Origin("imp", [10]))
    stored = await resources.read("Patient", "a")
    assert stored is not None and stored["name"][0]["family"] == "X"
    assert stored["meta"]["versionId"] == "1"
    # Equal content from a later line moves the mark: an earlier different line loses.
    await write([patient("b", "X")], origin=Origin("imp", [10]))
    await write([patient("b", "X")], origin=Origin("imp", [30]))
    await write([patient("b", "Y")], origin=Origin("imp", [20]))
    stored = await resources.read("Patient", "b")
    assert stored is not None and stored["name"][0]["family"] == "X"
    # Another import is free to change it.
    await write([patient("b", "Z")], origin=Origin("other", [1]))
    stored = await resources.read("Patient", "b")
    assert stored is not None and stored["name"][0]["family"] == "Z"
    assert stored["meta"]["versionId"] == "2"


async def test_one_batch_with_repeated_and_existing_ids(
    stores: tuple[OperationDataStore, ResourceStore], write: Write
) -> None:
    _, resources = stores
    await write([patient("old", "X"), patient("same", "S")])
    batch = [
        patient("new", "A"),
        patient("old", "Y"),  # an existing resource, changed: version 2
        patient("new", "B"),  # a later line of this batch changes it: version 2
        patient("same", "S"),  # unchanged content: no new version
        patient("back", "P"),
        patient("back", "Q"),  # a later line that comes first in the batch...
    ]
    positions = [1, 2, 3, 4, 6, 5]  # ... at position 5 < 6: it loses
    result = await write(batch, origin=Origin("imp", positions))
    assert (result.created, result.updated, result.unchanged) == (2, 2, 2)
    wanted = {"new": ("B", "2"), "old": ("Y", "2"), "same": ("S", "1"), "back": ("P", "1")}
    for id_, (family, version) in wanted.items():
        stored = await resources.read("Patient", id_)
        assert stored is not None, id_
        assert (stored["name"][0]["family"], stored["meta"]["versionId"]) == (family, version)
    # The same batch again (a resumed import re-reading committed lines) changes nothing.
    again = await write(batch, origin=Origin("imp", positions))
    assert (again.created, again.updated, again.unchanged) == (0, 0, 6)


async def test_a_later_line_wins_within_one_write(
    stores: tuple[OperationDataStore, ResourceStore],
) -> None:
    _, resources = stores
    # Equal lines at 10 and 30 in one write: the version they make (a) or confirm (b)
    # carries the later position, so a different line at 20 written afterwards loses.
    await resources.write([patient("b", "X")], origin=Origin("imp", [5]))
    for id_ in ("a", "b"):
        await resources.write(
            [patient(id_, "X"), patient(id_, "X")], origin=Origin("imp", [10, 30])
        )
        await resources.write([patient(id_, "Y")], origin=Origin("imp", [20]))
        stored = await resources.read("Patient", id_)
        assert stored is not None and stored["name"][0]["family"] == "X", id_
        assert stored["meta"]["versionId"] == "1", id_
    # Within one write, in any order: 30 wins over 20 and 10, whatever comes first.
    result = await resources.write(
        [patient("c", "Z"), patient("c", "Y"), patient("c", "X")],
        origin=Origin("imp", [30, 20, 10]),
    )
    stored = await resources.read("Patient", "c")
    assert stored is not None and stored["name"][0]["family"] == "Z"
    assert (result.created, result.updated, result.unchanged) == (1, 0, 2)


async def test_write_and_checkpoint_share_a_transaction(
    stores: tuple[OperationDataStore, ResourceStore], write: Write
) -> None:
    operations, resources = stores
    parent, children = an_import(batches=1)
    await operations.create_job(parent, children, max_active_per_client=5)
    leased = await operations.acquire("w", 30, utcnow())
    assert isinstance(leased, ImportBatchRecord)

    def checkpoint(result: WriteResult) -> JobRecord:
        assert isinstance(leased, ImportBatchRecord)
        leased.created += result.created
        leased.offset = 150
        return leased

    await write([patient("a", "X")], checkpoint=checkpoint)
    stored = await operations.get(leased.id)
    assert isinstance(stored, ImportBatchRecord) and (stored.created, stored.offset) == (1, 150)

    # Another worker takes the batch over: the stale checkpoint writes nothing at all.
    taken = await operations.acquire("w2", 30, utcnow() + timedelta(seconds=31))
    assert taken is not None
    with pytest.raises(LeaseLost):
        await write([patient("zombie", "Z"), patient("a", "Y")], checkpoint=checkpoint)
    assert await resources.read("Patient", "zombie") is None
    unchanged = await resources.read("Patient", "a")
    assert unchanged is not None and unchanged["name"][0]["family"] == "X"


async def test_a_block_that_meets_existing_resources_checkpoints_once(
    stores: tuple[OperationDataStore, ResourceStore], write: Write
) -> None:
    """An import's first block meets only new resources, its second meets them again
    (and one resource twice): each block's checkpoint is saved once, with that block's
    counts, and its versions are numbered on from the block before's, with no gap."""
    operations, resources = stores
    parent, children = an_import(batches=1)
    await operations.create_job(parent, children, max_active_per_client=5)
    leased = await operations.acquire("w", 30, utcnow())
    assert isinstance(leased, ImportBatchRecord)
    results: list[tuple[int, int, int]] = []

    def checkpoint(result: WriteResult) -> JobRecord:
        assert isinstance(leased, ImportBatchRecord)
        results.append((result.created, result.updated, result.unchanged))
        leased.created += result.created
        leased.updated += result.updated
        leased.unchanged += result.unchanged
        return leased

    await write([patient("a", "X"), patient("b", "X")], origin=Origin(parent.id, [1, 2]))
    second = [patient("a", "Y"), patient("b", "X"), patient("c", "X"), patient("c", "Z")]
    await write(second, origin=Origin(parent.id, [3, 4, 5, 6]), checkpoint=checkpoint)
    assert results == [(1, 2, 1)]
    stored = await operations.get(leased.id)
    assert isinstance(stored, ImportBatchRecord)
    assert (stored.created, stored.updated, stored.unchanged) == (1, 2, 1)
    versions = {v.seq: (v.id, v.version) async for v in resources.scan_versions()}
    assert sorted(versions) == [1, 2, 3, 4, 5]
    assert sorted(versions.values()) == [("a", 1), ("a", 2), ("b", 1), ("c", 1), ("c", 2)]


async def test_a_released_parent_is_not_renewed_by_a_late_heartbeat(
    operations: OperationDataStore,
) -> None:
    request = ExportRequest(kind=ExportKind.SYSTEM, request_url="http://x/$export")
    parent = ExportJobRecord(
        id=uuid.uuid4().hex,
        client="c1",
        request=request,
        fingerprint=request.fingerprint(),
        transaction_time=utcnow(),
        snapshot_seq=0,
    )
    await operations.create_job(parent, max_active_per_client=5)
    leased = await operations.acquire("planner", 30, utcnow())
    assert leased is not None
    leased.lease.owner = None  # planned: it follows its items now, with no lease
    leased.lease.expires_at = None
    await operations.add_children(leased, [])
    with pytest.raises(LeaseLost):
        await operations.heartbeat(leased.id, leased.lease.version, 30, utcnow())
    assert await operations.acquire("w", 30, utcnow() + timedelta(seconds=3600)) is None
