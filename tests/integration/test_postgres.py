"""PostgreSQL-only checks: concurrency across connections, snapshots under concurrent
writers, migrations, LISTEN/NOTIFY, and a server that goes away. The contract suites run
on PostgreSQL through the conftest fixtures; these need several connections or the
cluster itself."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from datastore.postgres import (
    PostgresDatabase,
    PostgresOperationDataStore,
    PostgresResourceStore,
    SchemaError,
)
from datastore.postgres.db import migrations
from datastore.resources import ExportQuery, Origin, to_micros
from datastore.versioning import Stamp, fhir_instant, first_version
from exportsvc.errors import StoreError, TooManyJobs
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
from tests.postgres import PostgresCluster


def export_job(client: str = "c1", types: list[str] | None = None) -> ExportJobRecord:
    request = ExportRequest(kind=ExportKind.SYSTEM, types=types or [], request_url="http://x/")
    return ExportJobRecord(
        id=uuid.uuid4().hex,
        client=client,
        request=request,
        fingerprint=request.fingerprint(),
        transaction_time=utcnow(),
        snapshot_seq=0,
    )


def import_family(batches: int = 3) -> tuple[ImportJobRecord, list[ImportBatchRecord]]:
    item = ImportInput(type="Patient", url="http://x/p.ndjson", size=300)
    request = ImportRequest(inputs=[item], request_url="http://x/$import")
    parent = ImportJobRecord(
        id=uuid.uuid4().hex,
        client="c1",
        fingerprint=request.fingerprint(),
        request=request,
        transaction_time=utcnow(),
        batch_count=batches,
    )
    children = [
        ImportBatchRecord(
            id=uuid.uuid4().hex,
            client="c1",
            parent_id=parent.id,
            input_index=0,
            input=item,
            start=i * 100,
            end=(i + 1) * 100,
            offset=i * 100,
            created_at=parent.created_at + timedelta(microseconds=i),
        )
        for i in range(batches)
    ]
    return parent, children


def patient(id_: str, family: str = "Doe") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": id_, "name": [{"family": family}]}


@pytest.fixture
async def dsn(postgres: PostgresCluster) -> str:
    return await postgres.acreate_database(f"x_{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[PostgresDatabase]:
    database = PostgresDatabase(dsn, min_size=2, max_size=10, migrate=True)
    await database.open()
    yield database
    await database.close()


@pytest.fixture
async def ops(db: PostgresDatabase) -> AsyncIterator[PostgresOperationDataStore]:
    store = PostgresOperationDataStore(db)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def res(db: PostgresDatabase) -> AsyncIterator[PostgresResourceStore]:
    store = PostgresResourceStore(db)
    await store.open()
    yield store
    await store.close()


# -- acquisition -------------------------------------------------------------------------


async def test_twenty_acquirers_one_winner(ops: PostgresOperationDataStore) -> None:
    record, _ = await ops.create_job(export_job(), max_active_per_client=5)
    now = utcnow()
    got = await asyncio.gather(*(ops.acquire(f"w{i}", 30, now) for i in range(20)))
    winners = [g for g in got if g is not None]
    assert len(winners) == 1 and winners[0].id == record.id and winners[0].lease.version == 1


async def test_many_jobs_each_acquired_once(ops: PostgresOperationDataStore) -> None:
    ids = set()
    for i in range(15):
        created, _ = await ops.create_job(export_job(f"c{i}"), max_active_per_client=5)
        ids.add(created.id)
    now = utcnow()
    got = await asyncio.gather(*(ops.acquire(f"w{i}", 30, now) for i in range(40)))
    leased = [g.id for g in got if g is not None]
    assert sorted(leased) == sorted(ids)  # every job once, none twice


async def test_concurrent_kickoffs_dedupe_and_limit(ops: PostgresOperationDataStore) -> None:
    same = await asyncio.gather(
        *(ops.create_job(export_job(), max_active_per_client=5) for _ in range(10))
    )
    assert sum(created for _, created in same) == 1
    assert len({r.id for r, _ in same}) == 1

    async def distinct(i: int) -> bool:
        try:
            await ops.create_job(export_job("c2", [f"T{i}"]), max_active_per_client=3)
        except TooManyJobs:
            return False
        return True

    results = await asyncio.gather(*(distinct(i) for i in range(10)))
    assert sum(results) == 3


async def test_concurrent_settles_see_every_batch(ops: PostgresOperationDataStore) -> None:
    parent, children = import_family(batches=10)
    await ops.create_job(parent, children, max_active_per_client=5)
    leased = await asyncio.gather(*(ops.acquire(f"w{i}", 30, utcnow()) for i in range(10)))

    async def finish(item: JobRecord | None) -> None:
        assert item is not None and item.parent_id is not None
        item.status = JobStatus.COMPLETED
        await ops.save(item)
        await ops.settle(item.parent_id)

    await asyncio.gather(*(finish(item) for item in leased))
    stored = await ops.get(parent.id)
    assert stored is not None and stored.status == JobStatus.COMPLETED


# -- resources: sequence numbers commit in order -------------------------------------------


async def test_concurrent_writers_never_expose_a_gap(dsn: str) -> None:
    """Eight writers on eight connections; a reader checks that every snapshot it takes
    is complete (seq 1..S all visible) and stays so."""
    writers = [PostgresResourceStore(dsn, max_size=1, migrate=True) for _ in range(8)]
    reader = PostgresResourceStore(dsn, max_size=2)
    for w in writers:
        await w.open()
    await reader.open()
    stop = asyncio.Event()
    snapshots: list[tuple[int, int]] = []

    async def write(n: int, w: PostgresResourceStore) -> None:
        for i in range(25):
            await w.write([patient(f"{n}-{i}-{j}") for j in range(20)])

    async def read() -> None:
        while not stop.is_set():
            snap = await reader.current_seq()
            visible = await reader.count(ExportQuery("Patient", snap))
            snapshots.append((snap, visible))

    try:
        reading = asyncio.create_task(read())
        await asyncio.gather(*(write(n, w) for n, w in enumerate(writers)))
        stop.set()
        await reading
        assert await reader.current_seq() == 8 * 25 * 20
        assert snapshots and all(snap == visible for snap, visible in snapshots)
        seqs = [v.seq async for v in reader.scan_versions()]
        assert seqs == list(range(1, 8 * 25 * 20 + 1))  # dense, nothing lost
    finally:
        for w in writers:
            await w.close()
        await reader.close()


async def test_copy_and_insert_paths_agree(db: PostgresDatabase) -> None:
    small = PostgresResourceStore(db, copy_threshold=10**9)
    big = PostgresResourceStore(db, copy_threshold=1)
    await small.write([patient(f"a{i}") for i in range(50)])
    await big.write([patient(f"a{i}", "Changed") for i in range(50)])
    versions = [(v.id, v.version, v.next_seq) async for v in small.scan_versions()]
    assert versions[:50] == [(f"a{i}", 1, 51 + i) for i in range(50)]
    assert versions[50:] == [(f"a{i}", 2, None) for i in range(50)]


async def test_versions_without_a_content_hash_are_compared_too(
    db: PostgresDatabase, res: PostgresResourceStore
) -> None:
    """Versions written before migration 0003 (or by an older process during a rolling
    upgrade) have no content hash; a write hashes the current ones it meets before it
    compares."""
    await res.write([patient("same"), patient("other"), patient("gone")])
    assert await res.delete("Patient", "gone")
    async with db.connection() as conn:
        await conn.execute("UPDATE resources SET content_hash = NULL")
    result = await res.write(
        [patient("same"), patient("other", "Changed"), patient("gone"), patient("new")]
    )
    assert (result.created, result.updated, result.unchanged) == (1, 2, 1)
    versions = {(v.id, v.version) async for v in res.scan_versions() if v.next_seq is None}
    assert versions == {("same", 1), ("other", 2), ("gone", 3), ("new", 1)}
    async with db.connection() as conn:
        unhashed = await conn.fetchval(
            "SELECT count(*) FROM resources "
            "WHERE content_hash IS NULL AND NOT deleted AND next_seq IS NULL"
        )
    assert unhashed == 0


async def test_types_skip_scan(res: PostgresResourceStore) -> None:
    await res.write([patient("p")])
    await res.write([{"resourceType": "Observation", "id": "o", "status": "final"}])
    await res.write([{"resourceType": "Condition", "id": "c"}])
    assert await res.types(1) == ["Patient"]
    assert await res.types(3) == ["Condition", "Observation", "Patient"]


# -- resources: a snapshot's time comes before every version after it -----------------------


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def paused_after(
    monkeypatch: pytest.MonkeyPatch, store: PostgresResourceStore, step: str
) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold ``store``'s writes after ``step`` (one of its own coroutines): set the first
    event when a write gets there, carry on once the second one is set."""
    reached, resume = asyncio.Event(), asyncio.Event()
    original = getattr(store, step)

    async def paused(*args: Any) -> None:
        await original(*args)
        reached.set()
        await resume.wait()

    monkeypatch.setattr(store, step, paused)
    return reached, resume


async def assert_exported_after(
    res: PostgresResourceStore, snapshot: tuple[int, datetime], expected: int
) -> None:
    """The versions after the snapshot (``expected`` of them) are stamped after its time,
    in their bytes as in their time column: the next export ``_since`` that time gets
    them all."""
    seq, moment = snapshot
    later = [v async for v in res.scan_versions() if v.seq > seq]
    for version in later:
        assert version.last_updated >= to_micros(moment, 0)
        assert version.raw is not None
        stamped = orjson.loads(version.raw)["meta"]["lastUpdated"]
        assert stamped == fhir_instant(EPOCH + timedelta(microseconds=version.last_updated))
    assert len(later) == expected
    since = ExportQuery("Patient", await res.current_seq(), since=moment)
    assert await res.count(since) >= expected


async def test_a_write_staged_before_a_snapshot_is_stamped_after_it(
    res: PostgresResourceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write stages its resources before it takes the write lock; an export's snapshot
    taken in between (the write holds no lock yet) does not count it, so the write must
    stamp its versions once it holds the lock, not when it stages them."""
    staged, resume = paused_after(monkeypatch, res, "_stage")
    writing = asyncio.create_task(res.write([patient("a"), patient("b")]))
    await asyncio.wait_for(staged.wait(), 10)
    snapshot = await res.snapshot()
    assert snapshot[0] == 0
    resume.set()
    await writing
    await assert_exported_after(res, snapshot, 2)


async def test_a_snapshot_waits_for_the_write_in_progress(
    db: PostgresDatabase, res: PostgresResourceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write holding the lock has stamped its versions; a snapshot taken meanwhile takes
    its time first and its sequence after that write commits, so it counts the write."""
    locked, resume = paused_after(monkeypatch, res, "_hash_legacy")
    writing = asyncio.create_task(res.write([patient("a"), patient("b")]))
    await asyncio.wait_for(locked.wait(), 10)
    snapshotting = asyncio.create_task(res.snapshot())
    deadline = asyncio.get_running_loop().time() + 10
    async with db.connection() as conn:  # until the snapshot waits for the lock (or is done)
        while not snapshotting.done() and not await conn.fetchval(LOCK_WAITERS):
            assert asyncio.get_running_loop().time() < deadline, "the snapshot never waited"
            await asyncio.sleep(0.01)
    resume.set()
    await writing
    snapshot = await snapshotting
    await assert_exported_after(res, snapshot, 0)
    assert snapshot[0] == 2


LOCK_WAITERS = """SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND classid = 1163416406 AND objid = 2 AND NOT granted"""


# -- schema ---------------------------------------------------------------------------------


async def test_concurrent_migrations_and_schema_check(postgres: PostgresCluster) -> None:
    dsn = await postgres.acreate_database(f"m_{uuid.uuid4().hex[:12]}")
    unmigrated = PostgresDatabase(dsn)
    with pytest.raises(SchemaError, match="out of date"):
        await unmigrated.open()
    racing = [PostgresDatabase(dsn, max_size=2, migrate=True) for _ in range(6)]
    await asyncio.gather(*(d.open() for d in racing))
    try:
        assert await racing[0].migrate() == []  # nothing left to apply
        await racing[0].check_schema()
        async with racing[0].connection() as conn:
            applied = await conn.fetchval("SELECT count(*) FROM schema_migrations")
            assert applied == len(migrations())
            await conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE number = 1")
        with pytest.raises(SchemaError, match="different file"):
            await racing[0].check_schema()
    finally:
        for d in racing:
            await d.close()


# -- NOTIFY ---------------------------------------------------------------------------------


async def wait_for(predicate: Any, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_listen_hears_kickoff_cancel_pause_and_release(
    ops: PostgresOperationDataStore,
) -> None:
    heard: list[str] = []
    async with ops.listen(heard.append):
        assert heard == [""]  # listening: look for work once
        record, _ = await ops.create_job(export_job(), max_active_per_client=5)
        await wait_for(lambda: record.id in heard)
        assert await ops.request_pause(record.id, True)
        await wait_for(lambda: heard.count(record.id) == 2)
        assert await ops.request_pause(record.id, False)
        leased = await ops.acquire("w", 30, utcnow())
        assert leased is not None
        assert await ops.request_cancel(record.id)
        await wait_for(lambda: heard.count(record.id) == 4)
        leased.status = JobStatus.QUEUED  # a drain releases the job
        await ops.save(leased)
        await wait_for(lambda: heard.count(record.id) == 5)


async def test_listen_reconnects(ops: PostgresOperationDataStore, dsn: str) -> None:
    heard: list[str] = []
    async with ops.listen(heard.append):
        admin = await asyncpg.connect(dsn)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND pid != pg_backend_pid()"
            )
            assert killed == 1
        finally:
            await admin.close()
        await wait_for(lambda: heard.count("") == 2)  # back, and told to look for work
        record, _ = await ops.create_job(export_job(), max_active_per_client=5)
        await wait_for(lambda: record.id in heard)


# -- failures -------------------------------------------------------------------------------


async def test_server_down_is_a_store_error() -> None:
    async with PostgresCluster() as cluster:
        store = PostgresOperationDataStore(
            PostgresDatabase(cluster.dsn, migrate=True, retry_seconds=0.5)
        )
        await store.open()
        try:
            await asyncio.to_thread(cluster.stop)
            with pytest.raises(StoreError):
                await store.get("x")
        finally:
            await store.close()


@pytest.mark.parametrize("threshold", [1, 10**9], ids=["copy", "insert"])
async def test_an_imported_block_stores_new_resources_straight_and_merges_the_rest(
    db: PostgresDatabase, threshold: int
) -> None:
    """A block as an import prepares it (pending stamp, content hash): the resources that
    have no version and come once go straight in, numbered first; one that exists, and a
    resource's second copy, go through the merge after them. Every one is stamped with the
    time of the write, and carries the import's position."""
    store = PostgresResourceStore(db, copy_threshold=threshold)
    await store.write([patient("old", "Before"), patient("same")])
    pending = Stamp.pending()
    lines = [
        patient("n1"),
        patient("old", "After"),
        patient("n2"),
        patient("same"),
        patient("n1", "Again"),
    ]
    versions = [first_version(orjson.loads(orjson.dumps(r)), pending, hashed=True) for r in lines]
    before = datetime.now(UTC)
    result = await store.write_versions(
        versions, origin=Origin("imp", [10, 20, 30, 40, 50]), restamp=pending
    )
    assert (result.created, result.updated, result.unchanged) == (2, 2, 1)
    rows = {(v.id, v.version): v async for v in store.scan_versions()}
    assert {key: (v.seq, v.next_seq) for key, v in rows.items()} == {
        ("old", 1): (1, 5),
        ("same", 1): (2, None),
        ("n1", 1): (3, 6),  # straight in
        ("n2", 1): (4, None),
        ("old", 2): (5, None),  # merged
        ("n1", 2): (6, None),
    }
    written = [rows[key] for key in (("n1", 1), ("n2", 1), ("old", 2), ("n1", 2))]
    stamps = {v.last_updated for v in written}
    assert len(stamps) == 1 and stamps.pop() >= to_micros(before, 0)
    for v in written:
        assert v.raw is not None and pending.instant.encode() not in v.raw
        stored = orjson.loads(v.raw)
        assert stored["meta"] == {
            "versionId": str(v.version),
            "lastUpdated": fhir_instant(datetime.fromtimestamp(v.last_updated / 1e6, UTC)),
        }
    assert orjson.loads(rows[("n1", 2)].raw or b"")["name"] == [{"family": "Again"}]
    async with db.connection() as conn:
        marks = await conn.fetch(
            "SELECT id, version, import_job, import_pos FROM resources ORDER BY seq"
        )
    assert [tuple(m) for m in marks] == [
        ("old", 1, None, None),
        ("same", 1, "imp", 40),  # unchanged: its version confirmed by the line
        ("n1", 1, "imp", 10),
        ("n2", 1, "imp", 30),
        ("old", 2, "imp", 20),
        ("n1", 2, "imp", 50),
    ]
