"""Grouped writes on SQLite (``SqliteDatabase.run_grouped``): an import's blocks share
one transaction, each whole; nothing of a failed group survives, and each writer that was
in it is told before it writes again."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from datastore.resources import WriteGroup, WriteResult
from datastore.sqlite import db as sqlite_db
from datastore.sqlite.db import SqliteDatabase
from datastore.sqlite.resources import SqliteResourceStore
from datastore.versioning import Stamp, first_version
from exportsvc.errors import WritesLost
from exportsvc.records import utcnow


def patient(id_: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": id_, "name": [{"family": id_}]}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteResourceStore]:
    resources = SqliteResourceStore(SqliteDatabase(tmp_path / "groups.sqlite3"))
    await resources.open()
    yield resources
    await resources.close()


Told = list[tuple[str, tuple[str, ...]]]


async def write(
    store: SqliteResourceStore, owner: str, *ids: str, told: Told | None = None, **kwargs: Any
) -> WriteResult:
    """``ids`` as a grouped write of ``owner``; ``told`` gets (owner, ids) once committed."""
    stamp = Stamp.at(utcnow())
    versions = [first_version(patient(i), stamp) for i in ids]
    said = told if told is not None else []
    group = WriteGroup((owner, 1), lambda: said.append((owner, ids)))
    return await store.write_versions(versions, group=group, **kwargs)


async def committed(store: SqliteResourceStore) -> set[str]:
    """The ids another connection sees: what is committed."""

    def ids(conn: sqlite3.Connection) -> set[str]:
        return {row[0] for row in conn.execute("SELECT id FROM resources")}

    return await store.db.read(ids)


async def test_grouped_writes_commit_together_before_the_next_other_call(
    store: SqliteResourceStore,
) -> None:
    told: Told = []
    await write(store, "batch-a", "a1", "a2", told=told)
    await write(store, "batch-b", "b1", told=told)
    assert await committed(store) == set()  # one open transaction, not yet committed
    assert told == []

    assert await store.current_seq() == 3  # any other call commits the group first
    assert await committed(store) == {"a1", "a2", "b1"}
    # Each writer is told, in order, before the call that committed returned.
    assert told == [("batch-a", ("a1", "a2")), ("batch-b", ("b1",))]


async def test_commit_grouped_commits_now(store: SqliteResourceStore) -> None:
    told: Told = []
    await write(store, "batch-a", "a1", told=told)
    await store.commit_grouped(("batch-a", 1))
    assert await committed(store) == {"a1"}
    assert told == [("batch-a", ("a1",))]
    await store.commit_grouped(("batch-a", 1))  # nothing open: nothing to do


async def test_a_group_commits_at_its_row_bound(store: SqliteResourceStore) -> None:
    store.db.group_rows = 3
    await write(store, "batch-a", "a1", "a2")
    assert await committed(store) == set()
    await write(store, "batch-a", "a3")
    assert await committed(store) == {"a1", "a2", "a3"}


async def test_an_idle_group_commits_after_its_time_bound(
    store: SqliteResourceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_db, "GROUP_SECONDS", 0.2)
    await write(store, "batch-a", "a1")
    assert await committed(store) == set()
    for _ in range(50):  # nothing else is called: the timer alone commits it
        await asyncio.sleep(0.1)
        if await committed(store):
            break
    assert await committed(store) == {"a1"}


async def test_a_failed_write_rolls_back_its_group_and_tells_every_writer_in_it(
    store: SqliteResourceStore,
) -> None:
    told: Told = []
    await write(store, "batch-a", "a1", told=told)

    def checkpoint(result: WriteResult) -> Any:
        raise RuntimeError("the checkpoint failed")

    with pytest.raises(RuntimeError, match="the checkpoint failed"):
        await write(store, "batch-b", "b1", checkpoint=checkpoint, told=told)
    await store.current_seq()
    assert await committed(store) == set()  # a1 shared the failed transaction
    assert told == []  # neither is ever said to be committed

    # batch-a's next write is refused before it writes anything: its run resumes from
    # its last committed checkpoint instead of saving one past the lost lines.
    with pytest.raises(WritesLost):
        await write(store, "batch-a", "a2")
    await write(store, "batch-b", "b2")  # batch-b had the error itself: not told twice
    await store.current_seq()
    assert await committed(store) == {"b2"}

    # Told once: the writer's next run, and any other writer, write again.
    await write(store, "batch-a", "a3")
    await write(store, "batch-c", "c1")
    await store.current_seq()
    assert await committed(store) == {"b2", "a3", "c1"}


async def test_a_batch_cannot_commit_past_writes_it_lost(store: SqliteResourceStore) -> None:
    """What a batch saves after its writes (its last checkpoint, its release) comes after
    ``commit_grouped``, which refuses when a group of its writes was rolled back, even
    when the batch has written nothing since."""
    await write(store, "batch-a", "a1")

    def checkpoint(result: WriteResult) -> Any:
        raise RuntimeError("the checkpoint failed")

    with pytest.raises(RuntimeError):
        await write(store, "batch-b", "b1", checkpoint=checkpoint)
    with pytest.raises(WritesLost):
        await store.commit_grouped(("batch-a", 1))
    await store.commit_grouped(("batch-b", 1))  # it had the error itself
    assert await committed(store) == set()


async def test_closing_commits_the_open_group(tmp_path: Path) -> None:
    path = tmp_path / "closing.sqlite3"
    store = SqliteResourceStore(SqliteDatabase(path))
    await store.open()
    await write(store, "batch-a", "a1")
    await store.close()

    reopened = SqliteResourceStore(SqliteDatabase(path))
    await reopened.open()
    try:
        assert await committed(reopened) == {"a1"}
    finally:
        await reopened.close()


async def test_a_killed_process_loses_its_open_group_whole(tmp_path: Path) -> None:
    """What a crash leaves: the group's writes gone together, nothing half-written."""
    path = tmp_path / "killed.sqlite3"
    script = f"""
import asyncio, os, signal, sys
sys.path.insert(0, {str(Path.cwd())!r})
from datastore.sqlite.db import SqliteDatabase
from datastore.sqlite.resources import SqliteResourceStore
from datastore.resources import WriteGroup
from datastore.versioning import Stamp, first_version
from exportsvc.records import utcnow

async def main():
    store = SqliteResourceStore(SqliteDatabase({str(path)!r}))
    await store.open()
    stamp = Stamp.at(utcnow())
    one = [first_version({{"resourceType": "Patient", "id": "kept"}}, stamp)]
    await store.write_versions(one)  # not grouped: committed
    lost = [{{"resourceType": "Patient", "id": f"lost{{i}}"}} for i in range(3)]
    two = [first_version(resource, stamp) for resource in lost]
    await store.write_versions(two, group=WriteGroup(("batch", 1), lambda: None))
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == -9, stderr.decode()

    store = SqliteResourceStore(SqliteDatabase(path))
    await store.open()
    try:
        assert await committed(store) == {"kept"}
        assert await store.current_seq() == 1
    finally:
        await store.close()
