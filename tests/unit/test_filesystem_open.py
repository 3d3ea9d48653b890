"""A download cancelled while its file opens on a thread closes that file."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from destinations.filesystem import _open_for_reading


def _open_fds(path: Path) -> list[str]:
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                fds.append(fd)
        except OSError:
            continue
    return fds


async def _until(condition: Callable[[], object], seconds: float = 5.0) -> object:
    """``condition()``'s first true value, polled with a deadline."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not (value := condition()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)
    return value


def _writer(fifo: Path) -> int | None:
    """A writer's end of ``fifo``, once a reader is in ``open()`` (before: ENXIO)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


async def test_a_reader_cancelled_while_opening_closes_the_file(tmp_path: Path) -> None:
    fifo = tmp_path / "Patient-0001.ndjson"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes
    reader = asyncio.ensure_future(_open_for_reading(fifo))
    writer = await _until(lambda: _writer(fifo))  # the reader's thread is in open()
    assert isinstance(writer, int)
    reader.cancel()  # before the loop has heard that the open returned
    try:
        await _until(reader.done)
        assert reader.cancelled()
        await _until(lambda: _open_fds(fifo) == [str(writer)])  # the reader's is closed
    finally:
        os.close(writer)


async def test_a_reader_gets_the_open_file(tmp_path: Path) -> None:
    path = tmp_path / "Patient-0001.ndjson"
    path.write_bytes(b"{}\n")
    with await _open_for_reading(path) as handle:
        assert handle.read() == b"{}\n"
    assert not _open_fds(path)
