"""The ExportDestinationClient commit contract (filesystem now; Azure joins in issue 3)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from destinations import ExportDestinationClient, file_name
from destinations.filesystem import FilesystemDestination
from exportsvc.errors import DestinationConflict, DestinationError
from exportsvc.records import OutputFile

Factory = Callable[[str], ExportDestinationClient]


@pytest.fixture(params=["filesystem"])
def make_destination(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    def make(job_id: str) -> ExportDestinationClient:
        return FilesystemDestination(job_id, tmp_path / "out", block_bytes=16)

    return make


@pytest.fixture
async def dest(make_destination: Factory) -> AsyncIterator[ExportDestinationClient]:
    client = make_destination("job1")
    await client.connect()
    yield client
    await client.close()


async def content(client: ExportDestinationClient, name: str) -> bytes:
    return b"".join([chunk async for chunk in client.read(name)])


def new_file(type_: str = "Patient", seq: int = 1) -> OutputFile:
    return OutputFile(type=type_, sequence=seq, name=file_name(type_, seq))


async def test_commit_returns_committed_state(dest: ExportDestinationClient) -> None:
    f = new_file()
    await dest.start_file(f)
    await dest.write(f.name, b"line one\n")
    await dest.write(f.name, b"line two, longer than a block\n")
    (committed,) = await dest.commit([f])
    assert committed.committed_bytes == 39
    assert await content(dest, f.name) == b"line one\nline two, longer than a block\n"


async def test_restore_drops_what_the_checkpoint_does_not_know(
    dest: ExportDestinationClient, make_destination: Factory
) -> None:
    a, b = new_file("Patient"), new_file("Observation")
    await dest.start_file(a)
    await dest.write(a.name, b"kept\n")
    (a,) = await dest.commit([a])
    # Committed after the checkpoint that recorded `a` (a crash before the next checkpoint).
    await dest.write(a.name, b"lost\n")
    await dest.start_file(b)
    await dest.write(b.name, b"lost too\n")
    await dest.commit([a, b])
    await dest.close()

    resumed = make_destination("job1")
    await resumed.connect()
    await resumed.restore([a])
    await resumed.write(a.name, b"again\n")
    (a,) = await resumed.commit([a])
    assert await content(resumed, a.name) == b"kept\nagain\n"
    assert a.committed_bytes == 11
    with pytest.raises(DestinationError):
        await content(resumed, b.name)
    await resumed.close()


async def test_restore_refuses_lost_committed_data(dest: ExportDestinationClient) -> None:
    f = new_file()
    await dest.start_file(f)
    await dest.write(f.name, b"x\n")
    (f,) = await dest.commit([f])
    with pytest.raises(DestinationConflict):
        await dest.restore([f.model_copy(update={"committed_bytes": 100})])


async def test_finalize_without_a_sweep_lets_go_and_deletes_nothing(
    dest: ExportDestinationClient, make_destination: Factory
) -> None:
    """A first lease's end: nothing unlisted can be there, so nothing is looked for."""
    listed, other = new_file("Patient", 1), new_file("Patient", 2)
    for f in (listed, other):
        await dest.start_file(f)
        await dest.write(f.name, b"{}\n")
    listed, other = await dest.commit([listed, other])
    await dest.finalize([listed], sweep=False)
    await dest.close()
    reader = make_destination("job1")
    assert await content(reader, listed.name) == b"{}\n"
    assert await content(reader, other.name) == b"{}\n"


async def test_finalize_keeps_only_listed_files(dest: ExportDestinationClient) -> None:
    keep, drop = new_file("Patient", 1), new_file("Patient", 2)
    for f in (keep, drop):
        await dest.start_file(f)
        await dest.write(f.name, b"{}\n")
    keep, drop = await dest.commit([keep, drop])
    await dest.finalize([keep])
    assert await content(dest, keep.name) == b"{}\n"
    with pytest.raises(DestinationError):
        await content(dest, drop.name)


async def test_delete_all(dest: ExportDestinationClient) -> None:
    f = new_file()
    await dest.start_file(f)
    await dest.write(f.name, b"{}\n")
    await dest.commit([f])
    await dest.delete_all()
    with pytest.raises(DestinationError):
        await content(dest, f.name)


async def test_second_writer_of_a_job_is_refused(
    dest: ExportDestinationClient, make_destination: Factory
) -> None:
    other = make_destination("job1")
    with pytest.raises(DestinationError, match="locked"):
        await other.connect()
    unrelated = make_destination("job2")
    await unrelated.connect()
    await unrelated.close()


@pytest.mark.parametrize("name", ["../x", ".lock", "a/b", ""])
def test_file_names_cannot_escape(make_destination: Factory, name: str) -> None:
    client = make_destination("job1")
    with pytest.raises(DestinationError):
        client.local_path(name)


def open_descriptors(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own one)
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


async def test_a_read_stopped_early_closes_its_file_at_once(dest: ExportDestinationClient) -> None:
    """A client hanging up mid-download: closing the read closes the file then, not
    whenever the garbage collector finalizes the generator (a ResourceWarning)."""
    f = new_file()
    await dest.start_file(f)
    await dest.write(f.name, b"x" * 100 + b"\n")
    await dest.commit([f])
    path = dest.local_path(f.name)
    assert path is not None
    writing = open_descriptors(path)  # the destination's own, to append
    async with contextlib.aclosing(dest.read(f.name, chunk=16)) as chunks:
        async for _ in chunks:
            assert open_descriptors(path) == writing + 1
            break
    assert open_descriptors(path) == writing
