"""The ResourceStore contract, run against every backend."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from datastore.resources import BlockQuery, ExportQuery, Origin, ResourceStore, WriteResult
from datastore.versioning import NewVersion, Stamp, first_version


def patient(
    id_: str, family: str = "Doe", updated: str = "2024-01-01T00:00:00.000Z"
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": id_,
        "name": [{"family": family}],
        "meta": {"lastUpdated": updated},
    }


def observation(id_: str, patient_id: str, value: int = 1) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": id_,
        "status": "final",
        "subject": {"reference": f"Patient/{patient_id}"},
        "valueInteger": value,
    }


async def all_rows(
    store: ResourceStore, query: ExportQuery, limit: int = 2
) -> list[tuple[str, int]]:
    rows, after = [], 0
    while True:
        page = await store.page(query, after, limit)
        resources = [orjson.loads(raw) for raw in page.raws]
        rows += [(r["id"], int(r["meta"]["versionId"])) for r in resources]
        after = page.next_after
        if page.last:
            return rows


async def test_versions_and_snapshot_isolation(resources: ResourceStore) -> None:
    await resources.write([patient("a"), patient("b"), patient("c")])
    snapshot = await resources.current_seq()
    # Written after the snapshot: an update, a deletion, a new resource.
    await resources.write([patient("a", family="Changed")])
    assert await resources.delete("Patient", "b")
    await resources.write([patient("d")])

    before = await all_rows(resources, ExportQuery("Patient", snapshot))
    assert sorted(before) == [("a", 1), ("b", 1), ("c", 1)]
    now = await all_rows(resources, ExportQuery("Patient", await resources.current_seq()))
    assert sorted(now) == [("a", 2), ("c", 1), ("d", 1)]

    old = await resources.read("Patient", "a", as_of=snapshot)
    assert old is not None and old["name"][0]["family"] == "Doe"
    current = await resources.read("Patient", "a")
    assert current is not None and current["meta"]["versionId"] == "2"
    assert await resources.read("Patient", "b") is None
    assert await resources.count(ExportQuery("Patient", snapshot)) == 3


async def test_identical_write_creates_no_version(resources: ResourceStore) -> None:
    first = await resources.write([patient("a")])
    again = await resources.write([patient("a")])
    assert (first.created, again.unchanged) == (1, 1)
    assert await resources.current_seq() == 1


async def test_one_resource_twice_in_one_write(resources: ResourceStore) -> None:
    await resources.write([patient("a"), patient("a", family="Second"), patient("b")])
    snap = await resources.current_seq()
    assert sorted(await all_rows(resources, ExportQuery("Patient", snap))) == [("a", 2), ("b", 1)]
    await resources.write([patient("a", family="Third")])
    rows = await all_rows(resources, ExportQuery("Patient", await resources.current_seq()))
    assert sorted(rows) == [("a", 3), ("b", 1)]
    versions = [(v.id, v.version, v.next_seq) async for v in resources.scan_versions()]
    assert versions == [("a", 1, 2), ("a", 2, 4), ("b", 1, None), ("a", 3, None)]


async def test_keyset_pages_cover_everything_once(resources: ResourceStore) -> None:
    await resources.write([patient(str(i)) for i in range(7)])
    await resources.write([observation("o1", "1")])
    rows = await all_rows(resources, ExportQuery("Patient", await resources.current_seq()), limit=3)
    assert [r[0] for r in rows] == [str(i) for i in range(7)]


async def test_since_until(resources: ResourceStore) -> None:
    await resources.write(
        [
            patient("old", updated="2020-01-01T00:00:00.000Z"),
            patient("mid", updated="2023-06-01T00:00:00.000Z"),
            patient("new", updated="2025-01-01T00:00:00.000Z"),
        ],
        keep_last_updated=True,
    )
    snap = await resources.current_seq()
    since = datetime(2023, 1, 1, tzinfo=UTC)
    until = datetime(2024, 1, 1, tzinfo=UTC)
    assert [r[0] for r in await all_rows(resources, ExportQuery("Patient", snap, since=since))] == [
        "mid",
        "new",
    ]
    query = ExportQuery("Patient", snap, since=since, until=until)
    assert [r[0] for r in await all_rows(resources, query)] == ["mid"]
    stored = await resources.read("Patient", "old")
    assert stored is not None and stored["meta"]["lastUpdated"] == "2020-01-01T00:00:00.000Z"


async def test_compartment_and_patients(resources: ResourceStore) -> None:
    await resources.write([patient("p1"), patient("p2")])
    await resources.write([observation("o1", "p1"), observation("o2", "p2")])
    await resources.write(
        [
            {
                "resourceType": "Observation",
                "id": "o3",
                "status": "final",
                "subject": {"reference": "Group/g"},
            }
        ]
    )
    snap = await resources.current_seq()
    anyone = ExportQuery("Observation", snap, compartment=True)
    assert sorted(r[0] for r in await all_rows(resources, anyone)) == ["o1", "o2"]
    only_p2 = ExportQuery("Observation", snap, compartment=True, patients=["p2"])
    assert [r[0] for r in await all_rows(resources, only_p2)] == ["o2"]
    patients = ExportQuery("Patient", snap, compartment=True, patients=["p1"])
    assert [r[0] for r in await all_rows(resources, patients)] == ["p1"]
    assert await resources.count(only_p2) == 1
    assert await resources.types(snap) == ["Observation", "Patient"]


async def test_ids_select_within_every_query_variant(resources: ResourceStore) -> None:
    await resources.write([patient("p1"), patient("p2"), patient("p3")])
    await resources.write([observation(f"o{n}", f"p{n % 3 + 1}") for n in range(1, 8)])
    snap = await resources.current_seq()
    some = ExportQuery("Observation", snap, ids=["o2", "o5", "o7", "nope"])
    assert sorted(r[0] for r in await all_rows(resources, some)) == ["o2", "o5", "o7"]
    assert await resources.count(some) == 3
    compartment = ExportQuery("Observation", snap, compartment=True, ids=["o2", "o5"])
    assert await resources.count(compartment) == 2
    p3 = ExportQuery("Observation", snap, compartment=True, patients=["p3"], ids=["o2", "o5"])
    assert [r[0] for r in await all_rows(resources, p3)] == ["o2", "o5"]
    p2 = ExportQuery("Observation", snap, compartment=True, patients=["p2"], ids=["o2", "o5"])
    assert await all_rows(resources, p2) == [] and await resources.count(p2) == 0
    none = ExportQuery("Patient", snap, ids=[])
    assert await all_rows(resources, none) == [] and await resources.count(none) == 0


async def test_a_page_stops_at_the_last_seq_of_a_work_item(resources: ResourceStore) -> None:
    await resources.write([patient(f"p{n}") for n in range(5)])
    await resources.write([patient("p1", family="Roe")])  # seq 6 supersedes seq 2
    snap = await resources.current_seq()
    first_three = ExportQuery("Patient", snap, last_seq=3)
    assert await all_rows(resources, first_three) == [("p0", 1), ("p2", 1)]
    page = await resources.page(first_three, 0, 10)
    assert page.last and page.next_after == 3
    assert await all_rows(resources, ExportQuery("Patient", snap, last_seq=99)) == [
        ("p0", 1),
        ("p2", 1),
        ("p3", 1),
        ("p4", 1),
        ("p1", 2),
    ]


async def test_stored_bytes_carry_meta(resources: ResourceStore) -> None:
    await resources.write([patient("a")])
    page = await resources.page(ExportQuery("Patient", 1), 0, 10)
    assert page.raws[0].startswith(b'{"resourceType":"Patient","id":"a"')
    assert b'"versionId":"1"' in page.raws[0]


async def test_scan_versions_includes_deletions(resources: ResourceStore) -> None:
    await resources.write([patient("a")])
    await resources.delete("Patient", "a")
    assert not await resources.delete("Patient", "a")
    versions = [v async for v in resources.scan_versions(batch=1)]
    assert [(v.version, v.deleted, v.next_seq) for v in versions] == [
        (1, False, 2),
        (2, True, None),
    ]


async def all_deletions(store: ResourceStore, query: ExportQuery) -> list[str]:
    ids, after = [], 0
    while True:
        page = await store.deletions(query, after, 1)
        ids += [d.id for d in page.rows]
        after = page.rows[-1].seq if page.rows else after
        if page.last:
            assert await store.count_deletions(query) == len(ids)
            return ids


async def deleted_at(store: ResourceStore, type_: str, id_: str) -> datetime:
    stamps = [v.last_updated async for v in store.scan_versions() if (v.type, v.id) == (type_, id_)]
    return datetime.fromtimestamp(stamps[-1] / 1_000_000, UTC)


async def test_deletions_in_a_window_as_of_the_snapshot(resources: ResourceStore) -> None:
    await resources.write([patient(p) for p in ("a", "b", "c", "d", "e")])
    await resources.write([observation("o1", "a"), observation("o2", "b"), observation("o3", "c")])
    await resources.delete("Patient", "a")  # at `since` exactly: not after it
    since = await deleted_at(resources, "Patient", "a")
    await resources.delete("Patient", "b")
    await resources.delete("Patient", "c")
    await resources.write([patient("c", family="Back")])  # re-created: current, not deleted
    await resources.delete("Observation", "o1")
    await resources.delete("Observation", "o2")
    await resources.delete("Patient", "e")
    snap = await resources.current_seq()
    await resources.delete("Patient", "d")  # after the snapshot
    await resources.delete("Observation", "o3")

    assert await all_deletions(resources, ExportQuery("Patient", snap, since=since)) == ["b", "e"]
    assert await all_deletions(resources, ExportQuery("Patient", snap)) == ["a", "b", "e"]
    b_at = await deleted_at(resources, "Patient", "b")
    until = ExportQuery("Patient", snap, since=since, until=b_at)  # until is inclusive
    assert await all_deletions(resources, until) == ["b"]
    before_b = ExportQuery("Patient", snap, since=since, until=b_at - timedelta(microseconds=1))
    assert await all_deletions(resources, before_b) == []
    # Compartments: those of the deleted (last live) versions.
    observations = ExportQuery("Observation", snap, since=since, compartment=True)
    assert await all_deletions(resources, observations) == ["o1", "o2"]
    only_b = ExportQuery("Observation", snap, since=since, compartment=True, patients=["b"])
    assert await all_deletions(resources, only_b) == ["o2"]
    patients = ExportQuery("Patient", snap, since=since, compartment=True, patients=["e", "c"])
    assert await all_deletions(resources, patients) == ["e"]
    page = await resources.deletions(ExportQuery("Patient", snap, since=since), 0, 10)
    assert [(d.id, d.version) for d in page.rows] == [("b", 2), ("e", 2)] and page.last
    assert page.rows[0].deleted_at == int(b_at.timestamp() * 1_000_000)


async def all_blocks(store: ResourceStore, query: BlockQuery) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    after = ("", 0)
    while True:
        rows, last = await store.blocks(query, after, 2)
        found += [(r.patient, r.type, r.id) for r in rows]
        after = (rows[-1].patient, rows[-1].seq) if rows else after
        if last:
            return found


async def test_blocks_by_patient_compartment(resources: ResourceStore) -> None:
    await resources.write(
        [patient("p2"), patient("p1", updated="2020-01-01T00:00:00.000Z")], keep_last_updated=True
    )
    await resources.write(
        [
            observation("o1", "p1"),
            observation("o2", "p2"),
            observation("o3", "ghost"),  # a compartment without a Patient resource
            {
                "resourceType": "Observation",
                "id": "both",
                "status": "final",
                "subject": {"reference": "Patient/p1"},
                "performer": [{"reference": "Patient/p2"}],
            },
            {"resourceType": "Organization", "id": "org"},
        ]
    )
    await resources.write([observation("o1", "p1", value=2)])  # a second version
    await resources.delete("Observation", "o2")
    snap = await resources.current_seq()
    await resources.write([observation("late", "p1")])

    everything = await all_blocks(resources, BlockQuery(snap))
    assert everything == [
        ("ghost", "Observation", "o3"),
        ("p1", "Patient", "p1"),
        ("p1", "Observation", "both"),
        ("p1", "Observation", "o1"),
        ("p2", "Patient", "p2"),
        ("p2", "Observation", "both"),
    ]
    rows, _ = await resources.blocks(BlockQuery(snap), ("p1", 0), 10)
    assert [(r.patient, r.id, r.version) for r in rows][2] == ("p1", "o1", 2)
    assert rows[0].raw.startswith(b'{"resourceType":"Patient","id":"p1"')
    only_p2 = BlockQuery(snap, types=["Observation"], patients=["p2"])
    assert await all_blocks(resources, only_p2) == [("p2", "Observation", "both")]
    since = BlockQuery(snap, types=["Patient"], since=datetime(2021, 1, 1, tzinfo=UTC))
    assert await all_blocks(resources, since) == [("p2", "Patient", "p2")]


async def test_versions_prepared_before_a_snapshot_are_stamped_after_it(
    resources: ResourceStore,
) -> None:
    """An import prepares its lines before writing them. An export snapshot taken in
    between must not end up after the versions' lastUpdated, or an export ``_since`` that
    snapshot's time would miss them: the store stamps them when it writes them."""
    pending = Stamp.pending()
    prepared = [first_version(patient(f"p{n}"), pending) for n in range(3)]
    seq, transaction_time = await resources.snapshot()
    assert seq == 0
    await resources.write_versions(prepared, restamp=pending)
    written = await all_rows(resources, ExportQuery("Patient", await resources.current_seq()))
    assert [id_ for id_, _ in written] == ["p0", "p1", "p2"]
    page = await resources.page(ExportQuery("Patient", await resources.current_seq()), 0, 10)
    in_millis = transaction_time.replace(microsecond=transaction_time.microsecond // 1000 * 1000)
    for raw in page.raws:
        assert pending.instant.encode() not in raw
        updated = datetime.fromisoformat(orjson.loads(raw)["meta"]["lastUpdated"])
        assert updated >= in_millis  # an instant has milliseconds; the store keeps micros
    # The next export _since this snapshot's time gets every one of them.
    since = ExportQuery("Patient", await resources.current_seq(), since=transaction_time)
    assert len(await all_rows(resources, since)) == 3


async def test_seeded_versions_keep_their_lastupdated(resources: ResourceStore) -> None:
    stamp = Stamp.at(datetime(2020, 5, 1, tzinfo=UTC))
    await resources.write_versions([first_version(patient("old"), stamp)])
    page = await resources.page(ExportQuery("Patient", await resources.current_seq()), 0, 10)
    assert orjson.loads(page.raws[0])["meta"]["lastUpdated"] == "2020-05-01T00:00:00.000Z"


STAMP = re.compile(rb'"lastUpdated":"[^"]*"')


def shuffled(resource: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The same resource with its keys (at the top and in ``name``) in another order."""
    keys = list(resource)
    rng.shuffle(keys)
    out = {k: resource[k] for k in keys}
    out["name"] = [dict(reversed(list(n.items()))) for n in resource["name"]]
    return out


def random_patient(rng: random.Random, prefix: str) -> dict[str, Any]:
    """One of a few ids, names and lastUpdated stamps: batches repeat ids, contents change
    or come back, and only the server's meta differs in many of them."""
    resource = {
        "resourceType": "Patient",
        "id": f"{prefix}{rng.randrange(4)}",
        "name": [{"family": rng.choice("ABC"), "given": ["g"]}],
        "meta": {"lastUpdated": f"2024-01-0{rng.randrange(1, 4)}T00:00:00.000Z"},
    }
    if rng.random() < 0.3:
        resource["meta"]["tag"] = [{"code": "t"}]
    return shuffled(resource, rng) if rng.random() < 0.5 else resource


async def histories(resources: ResourceStore, prefix: str) -> dict[str, list[Any]]:
    """Each resource of ``prefix``: its versions in order (number, deleted, bytes with the
    prefix and the server's lastUpdated taken out: it is the time of each write, unless
    kept), checked to chain (each superseded by the next, the last current)."""
    versions: dict[str, list[Any]] = {}
    async for v in resources.scan_versions(batch=7):
        if v.id.startswith(prefix):
            versions.setdefault(v.id.removeprefix(prefix), []).append(v)
    for chain in versions.values():
        assert [v.next_seq for v in chain] == [v.seq for v in chain[1:]] + [None], chain
    return {
        id_: [
            (v.version, v.deleted, STAMP.sub(b"", (v.raw or b"").replace(prefix.encode(), b"")))
            for v in chain
        ]
        for id_, chain in versions.items()
    }


async def test_a_batch_writes_as_its_resources_one_by_one(resources: ResourceStore) -> None:
    """Random batches (repeated ids, unchanged and changed content, keys in any order,
    deletions between them, import positions in any order from two imports or none)
    leave each resource exactly the versions that writing its resources one at a time
    leaves, and report the same counts."""
    rng = random.Random(20261123)
    for _ in range(60):
        size = rng.randint(1, 12)
        draws = [random_patient(random.Random(rng.random()), "") for _ in range(size)]
        job = rng.choice([None, "imp-1", "imp-2"])
        positions = [rng.randrange(100) for _ in range(size)]
        keep = rng.random() < 0.8

        def named(resource: dict[str, Any], prefix: str) -> dict[str, Any]:
            return {**resource, "id": prefix + resource["id"]}

        origin = Origin(job, positions) if job else None
        batched = await resources.write(
            [named(r, "b-") for r in draws], keep_last_updated=keep, origin=origin
        )
        one_by_one = WriteResult()
        for resource, position in zip(draws, positions, strict=True):
            single = await resources.write(
                [named(resource, "s-")],
                keep_last_updated=keep,
                origin=Origin(job, [position]) if job else None,
            )
            one_by_one.created += single.created
            one_by_one.updated += single.updated
            one_by_one.unchanged += single.unchanged
            one_by_one.versions += [(t, i.replace("s-", "b-"), n) for t, i, n in single.versions]
        assert (batched.created, batched.updated, batched.unchanged) == (
            one_by_one.created,
            one_by_one.updated,
            one_by_one.unchanged,
        )
        assert batched.versions == one_by_one.versions
        if rng.random() < 0.2:
            gone = f"{rng.randrange(4)}"
            assert await resources.delete("Patient", f"b-{gone}") == await resources.delete(
                "Patient", f"s-{gone}"
            )
    assert await histories(resources, "b-") == await histories(resources, "s-")


async def test_imported_blocks_write_as_their_lines_one_by_one(resources: ResourceStore) -> None:
    """Blocks as an import prepares them (a pending stamp; hashed and keyed as the store
    wants), from several imports in turn, meeting only new resources or also ones that
    exist (written before, by an earlier block of the same import, or twice in the
    block), leave each resource the versions that writing its lines one at a time leaves,
    and report the same counts."""
    rng = random.Random(20261205)

    def prepared(resource: dict[str, Any], prefix: str, pending: Stamp) -> NewVersion:
        named = orjson.loads(orjson.dumps({**resource, "id": prefix + resource["id"]}))
        return first_version(
            named, pending, hashed=resources.hashes_content, keyed=resources.hashes_keys
        )

    for block in range(40):
        size = rng.randint(1, 12)
        draws = [random_patient(random.Random(rng.random()), "") for _ in range(size)]
        for resource in draws:
            if rng.random() < 0.5:  # one no block has met yet
                resource["id"] = f"{block}-{rng.randrange(10**6)}"
        job = f"imp-{block // 5}"  # five blocks an import
        positions = [block * 100 + rng.randrange(100) for _ in range(size)]
        pending = Stamp.pending()
        batched = await resources.write_versions(
            [prepared(r, "b-", pending) for r in draws],
            origin=Origin(job, positions),
            restamp=pending,
        )
        one_by_one = WriteResult()
        for resource, position in zip(draws, positions, strict=True):
            pending = Stamp.pending()
            single = await resources.write_versions(
                [prepared(resource, "s-", pending)],
                origin=Origin(job, [position]),
                restamp=pending,
            )
            one_by_one.add(single)
        assert (batched.created, batched.updated, batched.unchanged) == (
            one_by_one.created,
            one_by_one.updated,
            one_by_one.unchanged,
        )
        assert sorted(batched.versions) == sorted(
            (t, i.replace("s-", "b-"), n) for t, i, n in one_by_one.versions
        )
    assert await histories(resources, "b-") == await histories(resources, "s-")
