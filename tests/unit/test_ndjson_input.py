"""Which lines each import batch owns, and per-line checks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from exportsvc.ndjson_input import Line, owned_lines, parse_resource, read_position


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
