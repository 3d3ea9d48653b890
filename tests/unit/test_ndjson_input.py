"""Which lines each import batch owns, and per-line checks."""

from __future__ import annotations

import itertools
import pickle
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import orjson
import pytest

from datastore.versioning import Stamp, key_hash
from exportsvc.ndjson_input import (
    Block,
    Line,
    owned_blocks,
    owned_lines,
    parse_resource,
    prepare_block,
    read_position,
    split_lines,
)


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def lines_of(
    data: bytes,
    start: int,
    end: int,
    offset: int | None = None,
    size: int = 3,
    max_bytes: int = 100,
) -> list[Line]:
    offset = start if offset is None else offset
    source = chunks(data[read_position(start, offset) :], size)
    return [
        line
        async for line in owned_lines(
            source, start=start, end=end, offset=offset, max_bytes=max_bytes
        )
    ]


DATA = b"aaaa\nbb\n\ncccccc\nd\neeeee"


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 7, 100])
@pytest.mark.parametrize("size", [1, 2, 5, 64])
async def test_every_line_is_owned_by_exactly_one_batch(batch: int, size: int) -> None:
    found: list[tuple[int, bytes | None]] = []
    for start in range(0, len(DATA), batch):
        end = min(start + batch, len(DATA))
        found += [(line.offset, line.data) for line in await lines_of(DATA, start, end, size=size)]
    assert found == [(0, b"aaaa"), (5, b"bb"), (8, b""), (9, b"cccccc"), (16, b"d"), (18, b"eeeee")]


async def test_resume_from_a_recorded_offset() -> None:
    lines = await lines_of(DATA, 0, len(DATA), offset=9)
    assert [line.data for line in lines] == [b"cccccc", b"d", b"eeeee"]
    assert lines[0].end == 16 and lines[-1].end == len(DATA)


async def test_too_long_lines_are_reported_not_buffered() -> None:
    data = b"ok\n" + b"x" * 50 + b"\nfine\n" + b"y" * 40
    lines = await lines_of(data, 0, len(data), max_bytes=10, size=4)
    assert [(line.offset, line.data) for line in lines] == [
        (0, b"ok"),
        (3, None),
        (54, b"fine"),
        (59, None),
    ]


def test_parse_resource_reasons() -> None:
    assert parse_resource(b'{"resourceType":"Patient","id":"a"}', None) == {
        "resourceType": "Patient",
        "id": "a",
    }
    assert "not valid JSON" in str(parse_resource(b"{nope", None))
    assert parse_resource(b"[1]", None) == "not a JSON object"
    assert (
        parse_resource(b'{"resourceType":"Nope","id":"a"}', None) == "unknown resourceType 'Nope'"
    )
    assert "in an input of type Patient" in str(
        parse_resource(b'{"resourceType":"Observation","id":"a"}', "Patient")
    )
    assert parse_resource(b'{"resourceType":"Patient"}', None) == "missing id"
    assert "invalid id" in str(parse_resource(b'{"resourceType":"Patient","id":"a b"}', None))
    assert "not valid JSON" in str(parse_resource(b"[" * 5000 + b"]" * 5000, None))
    assert parse_resource(b'{"resourceType":"Patient","id":"a","meta":"x"}', None) == (
        "meta is not a JSON object"
    )


async def blocks_of(
    data: bytes,
    start: int,
    end: int,
    *,
    size: int,
    block_bytes: int,
    block_lines: int,
    max_bytes: int = 100,
    flush: Callable[[], bool] | None = None,
) -> list[Block]:
    source = chunks(data[read_position(start, start) :], size)
    blocks = owned_blocks(
        source,
        start=start,
        end=end,
        offset=start,
        max_bytes=max_bytes,
        block_bytes=block_bytes,
        block_lines=block_lines,
        flush=flush,
    )
    return [block async for block in blocks]


@pytest.mark.parametrize("batch", [1, 4, 7, 100])
@pytest.mark.parametrize("size", [1, 2, 5, 64])
@pytest.mark.parametrize(("block_bytes", "block_lines"), [(1, 100), (6, 100), (9, 2), (100, 1)])
async def test_blocks_hold_each_owned_line_once_within_their_limits(
    batch: int, size: int, block_bytes: int, block_lines: int
) -> None:
    found: list[tuple[int, bytes | None]] = []
    for start in range(0, len(DATA), batch):
        end = min(start + batch, len(DATA))
        blocks = await blocks_of(
            DATA, start, end, size=size, block_bytes=block_bytes, block_lines=block_lines
        )
        for before, after in itertools.pairwise(blocks):
            assert before.end == after.offset  # whole lines, none skipped
        for block in blocks:
            lines = list(split_lines(block, 100))
            assert 1 <= len(lines) <= block_lines
            assert len(lines) == 1 or block.end - block.offset <= block_bytes
            found += [(line.offset, line.data) for line in lines]
    assert found == [(0, b"aaaa"), (5, b"bb"), (8, b""), (9, b"cccccc"), (16, b"d"), (18, b"eeeee")]


async def test_a_block_ends_before_a_line_too_long_to_buffer() -> None:
    data = b"ok\nok\n" + b"x" * 50 + b"\nfine\n" + b"y" * 40
    blocks = await blocks_of(
        data, 0, len(data), size=4, block_bytes=1000, block_lines=1000, max_bytes=10
    )
    assert [(b.offset, b.data, b.end) for b in blocks] == [
        (0, b"ok\nok\n", 6),
        (6, None, 57),
        (57, b"fine\n", 62),
        (62, None, 102),
    ]


async def test_flush_hands_over_the_lines_read_so_far() -> None:
    data = b"".join(b"line%d\n" % n for n in range(10))
    held = await blocks_of(data, 0, len(data), size=14, block_bytes=1000, block_lines=1000)
    assert len(held) == 1
    flushed = await blocks_of(
        data, 0, len(data), size=14, block_bytes=1000, block_lines=1000, flush=lambda: True
    )
    assert len(flushed) == 5 and b"".join(b.data or b"" for b in flushed) == data


def test_prepare_block_checks_and_stamps_every_line() -> None:
    lines = [
        b'{"resourceType":"Patient","id":"a","meta":{"versionId":"7","source":"s"}}',
        b"",
        b'{"resourceType":"Patient","id":"b"',
        b'{"resourceType":"Observation","id":"o"}',
        b'{"resourceType":"Patient","id":"' + b"z" * 64 + b'","active":true}',  # 98 bytes
    ]
    data = b"\n".join(lines)
    stamp = Stamp.at(datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC))
    prepared = prepare_block(Block(100, data, 100 + len(data)), "Patient", 90, stamp, 1000)
    assert prepared.lines == 5
    assert prepared.counts == {"Patient": 1}
    assert prepared.positions == [1100]
    (version,) = prepared.versions
    assert orjson.loads(version.raw)["meta"] == {
        "source": "s",
        "versionId": "1",
        "lastUpdated": "2026-01-02T03:04:05.678Z",
    }
    assert version.patients == frozenset({"a"})
    refused = [(index, offset, reason.split(" (")[0]) for index, offset, reason in prepared.refused]
    offsets = [100 + sum(len(line) + 1 for line in lines[:n]) for n in range(len(lines))]
    assert refused == [
        (2, offsets[2], "not valid JSON"),
        (3, offsets[3], "a Observation in an input of type Patient"),
        (4, offsets[4], "the line is longer than 90 bytes"),
    ]
    too_long = prepare_block(Block(5, None, 900), None, 90, stamp, 0)
    assert too_long.lines == 1 and too_long.refused[0][2] == "the line is longer than 90 bytes"
    assert version.content_hash is None and version.key_hash is None


def test_prepare_block_hashes_what_the_store_looks_up_by() -> None:
    """For the SQLite store the preparing process computes each version's key hash (and
    for PostgreSQL its content hash), so the thread writing the block does not."""
    data = b'{"resourceType":"Patient","id":"a"}\n{"resourceType":"Patient","id":"b"}\n'
    stamp = Stamp.pending()
    block = Block(0, data, len(data))
    keyed = prepare_block(block, None, 100, stamp, 0, keyed=True)
    assert [v.key_hash for v in keyed.versions] == [key_hash("Patient", i) for i in "ab"]
    assert all(v.content_hash is None for v in keyed.versions)
    hashed = prepare_block(block, None, 100, stamp, 0, hashed=True)
    assert all(v.key_hash is None and v.content_hash for v in hashed.versions)
    # The hashes survive the trip back from the preparing process (pickled by columns).
    again = pickle.loads(pickle.dumps(keyed))
    assert again.versions == keyed.versions
