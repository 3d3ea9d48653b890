"""The ResourceStore contract, run against every backend."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime
from typing import Any

from datastore.resources import ExportQuery, Origin, ResourceStore, WriteResult


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
        rows += [(r.id, r.version) for r in page.rows]
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


async def test_stored_bytes_carry_meta(resources: ResourceStore) -> None:
    await resources.write([patient("a")])
    page = await resources.page(ExportQuery("Patient", 1), 0, 10)
    assert page.rows[0].raw.startswith(b'{"resourceType":"Patient","id":"a"')
    assert b'"versionId":"1"' in page.rows[0].raw


async def test_scan_versions_includes_deletions(resources: ResourceStore) -> None:
    await resources.write([patient("a")])
    await resources.delete("Patient", "a")
    assert not await resources.delete("Patient", "a")
    versions = [v async for v in resources.scan_versions(batch=1)]
    assert [(v.version, v.deleted, v.next_seq) for v in versions] == [
        (1, False, 2),
        (2, True, None),
    ]


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
