"""Pure helpers for reading ndjson inputs: which lines a batch owns, and line checks.

A batch owns the lines whose first byte lies in ``[start, end)``. Reading from
``start - 1`` tells whether a line begins exactly at ``start`` (the byte before it is a
newline) or the line under ``start`` began earlier and belongs to the batch before.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from exportsvc.fhir.compartment import RESOURCE_TYPES

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@dataclass(frozen=True, slots=True)
class Line:
    offset: int
    """Byte offset of the line's first byte in the input."""
    data: bytes | None
    """The line without its newline; None when it is longer than the limit."""
    end: int
    """Offset just past the line (and its newline): where the next line starts."""


def read_position(start: int, offset: int) -> int:
    """Where to start reading: one byte early at a fresh batch start, to see the boundary."""
    return start - 1 if offset == start and start > 0 else offset


async def owned_lines(
    chunks: AsyncIterator[bytes], *, start: int, end: int, offset: int, max_bytes: int
) -> AsyncIterator[Line]:
    """The lines of ``[start, end)`` from ``offset`` on (a line start, or ``start``);
    ``chunks`` are the input's bytes from ``read_position(start, offset)``."""
    pos = read_position(start, offset)
    buf = bytearray()
    skipping = pos < offset  # drop up to the first newline: the boundary byte or a tail
    too_long_at: int | None = None
    async for chunk in chunks:
        buf += chunk
        while True:
            newline = buf.find(b"\n")
            if skipping:
                if newline < 0:
                    pos += len(buf)
                    buf.clear()
                    break
                del buf[: newline + 1]
                pos += newline + 1
                skipping = False
                continue
            if (too_long_at if too_long_at is not None else pos) >= end:
                return
            if newline < 0:
                if len(buf) > max_bytes and too_long_at is None:
                    too_long_at = pos
                if too_long_at is not None:  # keep no more than needed: skip its rest
                    pos += len(buf)
                    buf.clear()
                break
            if too_long_at is not None or newline > max_bytes:
                line_start = too_long_at if too_long_at is not None else pos
                yield Line(line_start, None, pos + newline + 1)
                too_long_at = None
            else:
                yield Line(pos, bytes(buf[:newline]), pos + newline + 1)
            del buf[: newline + 1]
            pos += newline + 1
    if skipping:
        return
    if too_long_at is not None:
        if too_long_at < end:
            yield Line(too_long_at, None, pos + len(buf))
    elif buf and pos < end:
        yield Line(pos, bytes(buf), pos + len(buf))


MAX_DEPTH = 100
"""Default ``EXPORTSVC_IMPORT_MAX_DEPTH``. orjson reads 1024 levels but writes only 254:
a deeper resource would be accepted here and then fail the batch when it is stored."""


def parse_resource(
    data: bytes, expected_type: str | None, *, max_depth: int = MAX_DEPTH
) -> dict[str, Any] | str:
    """The resource on a line, or the reason it is refused."""
    try:
        resource = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON ({str(exc).split(':', 1)[0]})"
    if not isinstance(resource, dict):
        return "not a JSON object"
    # Cheap test first: a line with few brackets cannot nest deeply.
    if data.count(b"{") + data.count(b"[") > max_depth and _deeper_than(resource, max_depth):
        return f"nested more than {max_depth} levels deep"
    type_ = resource.get("resourceType")
    if not isinstance(type_, str) or type_ not in RESOURCE_TYPES:
        return f"unknown resourceType {str(type_)[:64]!r}"
    if expected_type is not None and type_ != expected_type:
        return f"a {type_} in an input of type {expected_type}"
    id_ = resource.get("id")
    if not isinstance(id_, str) or not FHIR_ID.fullmatch(id_):
        return f"missing or invalid id {str(id_)[:80]!r}" if id_ is not None else "missing id"
    return resource


def _deeper_than(value: dict[str, Any], limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` levels (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False
