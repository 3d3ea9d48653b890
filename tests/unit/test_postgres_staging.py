"""The PostgreSQL merge's staged resources: byte for byte the versions ``new_version``
makes, once the store puts the number in; content hashes equal exactly for equal content."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from datastore.postgres.staging import (
    PENDING_STAMP_AT,
    Staged,
    first_version_marker,
    split_first_version,
    stage,
)
from datastore.versioning import (
    Stamp,
    content_hash,
    content_without_meta,
    first_version,
    new_version,
)

NOW = datetime(2026, 11, 23, 1, 2, 3, 456789, tzinfo=UTC)
STAMP = Stamp.at(NOW)

RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "a", "name": [{"family": "Doe"}]},
    {  # meta first, with the server's fields and one of the client's
        "meta": {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z", "source": "x"},
        "resourceType": "Observation",
        "id": "o",
        "subject": {"reference": "Patient/a"},
        "valueQuantity": {"value": 1.5},
    },
    {"resourceType": "Patient", "id": "b", "meta": {"lastUpdated": "2024-02-03T04:05:06.789Z"}},
    {"resourceType": "Patient", "id": "c", "meta": {}, "text": {"div": "versionId ünïcode"}},
    {  # a contained resource with a meta of its own, as first_version writes one
        "resourceType": "Observation",
        "id": "d",
        "contained": [
            {"resourceType": "Patient", "id": "x", "meta": {"versionId": "1", "lastUpdated": "x"}}
        ],
        "meta": {"profile": ["http://example.org/p"]},
    },
]


@pytest.mark.parametrize("resource", RESOURCES)
@pytest.mark.parametrize("keep_last_updated", [False, True])
@pytest.mark.parametrize("version", [1, 12, 3456])
def test_staged_bytes_are_the_new_version_with_its_number(
    resource: dict[str, Any], keep_last_updated: bool, version: int
) -> None:
    previous = None if version == 1 else (version - 1, None)
    made = new_version(resource, previous, NOW, keep_last_updated=keep_last_updated)
    staged = stage(resource, STAMP, keep_last_updated=keep_last_updated, marker="m4rk3r")
    assert made is not None
    assert staged.head + str(version).encode() + staged.tail == made.raw
    assert (staged.type, staged.id, staged.last_updated) == (made.type, made.id, made.last_updated)
    assert staged.patients == made.patients


def stamped_by_the_merge(staged: Staged, version: int, stamp: Stamp) -> tuple[bytes, int]:
    """The bytes and time column the merge stores (``overlay`` at ``stamp_at``)."""
    tail, micros = staged.tail, staged.last_updated
    if staged.stamp_at is not None:
        at = staged.stamp_at - 1
        tail = tail[:at] + stamp.instant.encode() + tail[at + len(stamp.instant) :]
        micros = stamp.micros
    return staged.head + str(version).encode() + tail, micros


@pytest.mark.parametrize("resource", RESOURCES)
@pytest.mark.parametrize("keep_last_updated", [False, True])
def test_a_pending_stamp_is_where_the_merge_puts_the_time_of_its_write(
    resource: dict[str, Any], keep_last_updated: bool
) -> None:
    """Staged before the write lock, stamped under it: the merge overlays the instant at
    ``stamp_at``, and gets byte for byte the version made at that time; a resource that
    keeps its lastUpdated (seeding) has none."""
    staged = stage(resource, Stamp.pending(), keep_last_updated=keep_last_updated, marker="m")
    made = new_version(resource, None, NOW, keep_last_updated=keep_last_updated)
    assert made is not None
    kept = keep_last_updated and "lastUpdated" in resource.get("meta", {})
    assert (staged.stamp_at is None) == kept
    assert stamped_by_the_merge(staged, 1, STAMP) == (made.raw, made.last_updated)


def test_a_resource_holding_the_marker_gets_another() -> None:
    resource = {"resourceType": "Patient", "id": "a", "name": [{"family": "m4rk3r"}]}
    staged = stage(resource, STAMP, keep_last_updated=False, marker="m4rk3r")
    made = new_version(resource, None, NOW, keep_last_updated=False)
    assert made is not None and staged.head + b"1" + staged.tail == made.raw


def test_content_hash_ignores_key_order_and_the_servers_meta_only() -> None:
    one = {"resourceType": "Patient", "id": "a", "name": [{"family": "D", "given": ["J"]}]}
    reordered = {"name": [{"given": ["J"], "family": "D"}], "id": "a", "resourceType": "Patient"}
    stamped = {**one, "meta": {"versionId": "3", "lastUpdated": "2024-01-01T00:00:00Z"}}
    tagged = {**one, "meta": {"tag": [{"code": "t"}]}}
    changed = {**one, "name": [{"family": "E", "given": ["J"]}]}
    hashes = [content_hash(content_without_meta(r)) for r in (one, reordered, stamped)]
    assert len(set(hashes)) == 1
    assert content_hash(content_without_meta(tagged)) != hashes[0]
    assert content_hash(content_without_meta(changed)) != hashes[0]
    staged = stage(stamped, STAMP, keep_last_updated=False, marker="m")
    assert staged.content_hash == hashes[0]


def test_a_resource_needs_a_type_and_an_id() -> None:
    with pytest.raises(ValueError, match="resourceType and id"):
        stage({"resourceType": "Patient"}, STAMP, keep_last_updated=False, marker="m")


@pytest.mark.parametrize("resource", RESOURCES)
def test_an_imported_line_stages_from_its_bytes_as_its_resource_does(
    resource: dict[str, Any],
) -> None:
    """An import's first version (stamped pending, hashed) split around its number
    without parsing: the head, tail, stamp place and content hash that staging the
    resource makes."""
    pending = Stamp.pending()
    staged = stage(resource, pending, keep_last_updated=False, marker="m4rk3r")
    version = first_version(orjson.loads(orjson.dumps(resource)), pending, hashed=True)
    head, tail = split_first_version(version.raw, first_version_marker(pending))
    assert (head, tail, PENDING_STAMP_AT) == (staged.head, staged.tail, staged.stamp_at)
    assert version.content_hash == staged.content_hash
    assert version.patients == staged.patients


def test_a_version_without_the_pending_stamp_is_refused() -> None:
    version = first_version({"resourceType": "Patient", "id": "a"}, STAMP)
    with pytest.raises(ValueError, match="pending stamp"):
        split_first_version(version.raw, first_version_marker(Stamp.pending()))
