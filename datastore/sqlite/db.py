"""A SQLite connection driven from asyncio: every call runs on one dedicated thread.

sqlite3 blocks, so it never runs on the event loop. Writes and checkpoints go
through one connection on one thread; export reads (pages, counts, bounds) through a
small pool of read-only connections, each on a thread of its own, so two export items
read at the same time (sqlite3 lets go of the GIL while SQLite steps) and neither waits
behind the other's page or a checkpoint's transaction. Several processes may share the
file (WAL mode, busy timeout).
Named queries live in ``sql/*.sql`` (``-- name: x`` sections); migrations are numbered
files in ``sql/migrations`` applied in order and tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from datastore.versioning import key_hash  # the function the schema calls
from exportsvc.errors import WritesLost

T = TypeVar("T")
log = logging.getLogger(__name__)

_SQL = resources.files("datastore.sqlite") / "sql"
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def queries(filename: str) -> dict[str, str]:
    """The named queries of ``sql/<filename>``."""
    text = (_SQL / filename).read_text()
    parts = _NAME.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2], strict=True)}


def migrations() -> list[tuple[int, str]]:
    found = []
    for entry in (_SQL / "migrations").iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in migrations():
            if number > current:
                for statement in script.split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {int(number)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


WAL_RESTART_FRAMES = 65536
"""Past this many frames (256 MiB of 4 KiB pages) in the write-ahead log, the writer
restarts the log (see :class:`_Checkpointer`)."""

CHECKPOINT_INTERVAL_SECONDS = 0.5
"""At most one passive checkpoint this often (see :class:`_Checkpointer`). An import's
transactions each rewrite most leaf pages of the randomly keyed indexes; a checkpoint after
every one copied each page back every time, one every half second copies the last of its
versions (a 1M import: 33.6-39.5 s, against 38.3-41.1 s with a checkpoint per write)."""


class _Checkpointer:
    """Copies the write-ahead log back into the database on a thread and connection of
    its own, after writes, instead of inside the writer's next COMMIT (SQLite's automatic
    checkpoint): the copy then overlaps the writer's next transaction. PASSIVE: it never
    waits for readers or writers, so it can neither block nor deadlock anyone.

    A passive checkpoint never resets the log, though: under writes that do not pause (a
    seed, a large import) the log grew without end (6.4 GB beside a 3.2 GB database 90 s
    into a 10M seed), and every page the writer or a reader looks up searches more of its
    index. When a checkpoint finds more than :data:`WAL_RESTART_FRAMES` frames in the log,
    it goes on with a RESTART checkpoint: that one waits for the transaction being
    written, holds writers off while it copies the frames left (most are copied by then)
    and waits for readers of the log to finish, and the next transaction writes the log
    from its start. The writer waits for it between two transactions: left to SQLite's
    busy handler, the restart lost the lock to a writer that never pauses nearly every
    time (a 4.6 GB log 5 minutes into a 10M seed). Asked of the writer instead, it mostly
    found this thread's checkpoint running and gave up: SQLite does not wait for one."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._wanted = threading.Event()
        self.restarting = threading.Event()
        """Set while a restart waits for or runs its checkpoint: the writer holds its next
        transaction back (:meth:`hold_writes`), or it would win the lock every time."""
        self._restarted = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"wal-{path.name}", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wanted.set()

    def hold_writes(self) -> None:
        """On the writer's thread, between transactions: wait while a restart runs (at
        most a few seconds; past that the writer goes on and the log waits)."""
        with self._restarted:
            self._restarted.wait_for(lambda: not self.restarting.is_set(), timeout=5)

    def close(self) -> None:
        self._closing.set()
        self._wanted.set()
        self._thread.join()

    def _loop(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._closing.is_set():
                    return
                try:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames > WAL_RESTART_FRAMES:
                        self._restart(conn)
                except sqlite3.Error as exc:  # the next write pokes again
                    log.warning("wal checkpoint of %s failed: %s", self._path.name, exc)
                self._closing.wait(CHECKPOINT_INTERVAL_SECONDS)
        finally:
            conn.close()

    def _restart(self, conn: sqlite3.Connection) -> None:
        """RESTART: waits for the transaction being written, copies the frames left and
        waits for the log's readers; the next transaction writes the log from its start."""
        self.restarting.set()
        try:
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        finally:
            with self._restarted:
                self.restarting.clear()
                self._restarted.notify_all()


class _Reader:
    """A read-only connection and the one thread it runs on."""

    conn: sqlite3.Connection

    def __init__(self, path: Path, number: int) -> None:
        self.path = path
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-read{number}")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.conn = await loop.run_in_executor(self.executor, _connect_reader, self.path)

    def close(self) -> None:
        if hasattr(self, "conn"):
            self.executor.submit(self.conn.close).result()
        self.executor.shutdown(wait=True)


def _connect_reader(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA query_only = 1")
    # A keyset scan reads each page once: the map (see _connect) does the reading and
    # a small cache keeps the b-tree's inner pages; 64 MiB more per reader is RSS for
    # nothing.
    conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
    conn.execute("PRAGMA cache_size = -8192")
    return conn


MMAP_BYTES = 64 << 20

GROUP_ROWS = 50_000
GROUP_SECONDS = 2.0
"""Grouped writes (:meth:`SqliteDatabase.run_grouped`) share one transaction until it holds
this many rows (``group_rows``) or is this old. An import block (4 MiB, ~4,600 rows)
dirties most leaf pages of the randomly keyed indexes; its commit writes them all again:
loop (c)'s own inserts took 19.4-21.3 s per 1M in transactions of 4,600 rows and
11.7-13.4 s in 50,000. Alternated 1M imports: 26.3/25.1/24.9/24.4 s grouped,
25.7/27.6/26.8/27.8 s not, at the same peak RSS. At 10M no gain (630 s against 613 s, one
run each), probably because a group there touches more index leaves than the cache holds."""


class _Group:
    """The open transaction of grouped writes: its rows, when it began, its writers, and
    what to call on their event loops once it has committed."""

    __slots__ = ("committed", "owners", "rows", "started")

    def __init__(self) -> None:
        self.rows = 0
        self.started = time.monotonic()
        self.owners: set[Hashable] = set()
        self.committed: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []


class SqliteDatabase:
    """One connection on one thread for writes, and up to ``readers`` read-only
    connections for :meth:`read`. Both stores of a process share it, so an import batch
    writes its resources and its checkpoint in one transaction; ``open`` and ``close``
    count their callers."""

    def __init__(self, path: Path | str, *, readers: int = 2, group_rows: int = GROUP_ROWS) -> None:
        self.path = Path(path)
        self.group_rows = group_rows
        """A group of writes commits once it holds this many rows (0: each write alone)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{self.path.name}")
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._users = 0
        self._max_readers = readers
        self._readers: list[_Reader] = []
        self._idle: asyncio.Queue[_Reader] | None = None
        self._group: _Group | None = None
        """The open transaction of grouped writes (on the database thread only)."""
        self._lost: set[Hashable] = set()
        """Writers whose grouped writes were rolled back, told at their next one."""

    async def open(self) -> None:
        self._users += 1
        if self._conn is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await self._submit(self._connect)
        await self.run(_migrate)
        self._checkpointer = _Checkpointer(self.path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.create_function("key_hash", 2, key_hash, deterministic=True)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        # Memory: the mapped part of the file counts in the process's RSS, so the map is
        # capped at 64 MiB (beyond it SQLite reads into its cache): a 300k-store export
        # peaked at ~225 MB RSS instead of ~400 MB with a 256 MiB map, at the same speed
        # within this machine's noise. The writer's cache of 32 MiB holds the pages an
        # import's 4 MiB transaction dirties (most leaves of the randomly keyed indexes):
        # with 16 MiB it spilled them to the log mid-transaction, and a 1M import took
        # 32.7-36.2 s against 28.5-31.3 s, for 20 MB less peak; 64 MiB was no faster.
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        conn.execute("PRAGMA cache_size = -32768")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # _Checkpointer does it
        return conn

    async def _submit(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the database thread, after committing the grouped
        writes before it: whatever ``fn`` reads or writes, it does so after them."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"database {self.path} is not open")
        checkpointer = self._checkpointer

        def call() -> T:
            self._end_group(conn)
            if checkpointer is not None and checkpointer.restarting.is_set():
                checkpointer.hold_writes()
            changes = conn.total_changes
            result = fn(conn)
            if checkpointer is not None and conn.total_changes != changes:
                checkpointer.poke()
            return result

        return await self._submit(call)

    async def run_grouped(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        rows: int,
        owner: Hashable,
        on_commit: Callable[[], None] | None = None,
    ) -> T:
        """Run ``fn(connection)`` as a write that may share its transaction with the
        grouped writes before and after it, of any owner: it is committed once the group
        holds ``group_rows`` rows or is :data:`GROUP_SECONDS` old, or before any
        :meth:`run` call (the process's next other statement); then ``on_commit`` is
        called on this event loop. Each write stays whole: ``fn`` is all in a commit or
        none of it. When ``fn`` fails, or the group's COMMIT does, the whole group is
        rolled back, and every other owner in it gets :class:`WritesLost` at its next
        grouped write or :meth:`commit_grouped`, before anything more is written for it:
        an import batch then resumes from its last committed checkpoint. A process that
        ends with a group open (killed) loses it whole, just the same."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"database {self.path} is not open")
        checkpointer = self._checkpointer
        loop = asyncio.get_running_loop()

        def call() -> tuple[T, _Group | None]:
            self._raise_if_lost(owner)
            group = self._group
            if group is None:
                if checkpointer is not None and checkpointer.restarting.is_set():
                    checkpointer.hold_writes()
                conn.execute("BEGIN IMMEDIATE")
                group = self._group = _Group()
                opened = group
            else:
                opened = None
            group.owners.add(owner)
            try:
                result = fn(conn)
            except BaseException:
                self._rollback_group(conn, told=owner)
                raise
            group.rows += rows
            if on_commit is not None:
                group.committed.append((loop, on_commit))
            if group.rows >= self.group_rows or time.monotonic() - group.started >= GROUP_SECONDS:
                self._end_group(conn)
            elif checkpointer is not None and checkpointer.restarting.is_set():
                self._end_group(conn)  # the restart waits for it
            return result, opened

        result, opened = await self._submit(call)
        if opened is not None and self._group is opened:  # a group that stays idle ends
            loop.call_later(GROUP_SECONDS, self._end_later, opened)
        return result

    async def commit_grouped(self, owner: Hashable) -> None:
        """Commit the open group of writes now; :class:`WritesLost` when a group that held
        ``owner``'s writes was rolled back since its last grouped call: what comes after
        a batch's writes (its last checkpoint, its release) never builds on lost ones."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"database {self.path} is not open")

        def call() -> None:
            self._raise_if_lost(owner)
            self._end_group(conn)

        await self._submit(call)

    def _raise_if_lost(self, owner: Hashable) -> None:
        if owner in self._lost:
            self._lost.discard(owner)
            raise WritesLost("a transaction this batch shared with others was rolled back")

    def _end_later(self, group: _Group) -> None:
        conn = self._conn
        if conn is not None and self._group is group:
            future = self._executor.submit(self._end_group, conn, group)
            future.add_done_callback(_log_failed_commit)

    def _end_group(self, conn: sqlite3.Connection, group: _Group | None = None) -> None:
        """Commit the open group (``group``: only if it is still that one)."""
        if self._group is None or (group is not None and self._group is not group):
            return
        try:
            conn.execute("COMMIT")
        except BaseException:
            self._rollback_group(conn)
            raise
        committed, self._group = self._group.committed, None
        if self._checkpointer is not None:
            self._checkpointer.poke()
        for loop, callback in committed:
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody to tell
                loop.call_soon_threadsafe(callback)

    def _rollback_group(self, conn: sqlite3.Connection, told: Hashable = None) -> None:
        """Roll the open group back; its owners (but ``told``, who gets the error) learn
        of it at their next grouped write."""
        group, self._group = self._group, None
        if group is None:
            return
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        self._lost |= group.owners - {told}

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on a read-only connection of the pool (one made when
        none is free and the pool is not full; else the first to be freed). Each call
        is its own read transaction: it sees every commit made before it began."""
        if self._conn is None:
            raise RuntimeError(f"database {self.path} is not open")
        if self._idle is None:
            self._idle = asyncio.Queue()
        idle = self._idle
        if idle.empty() and len(self._readers) < self._max_readers:
            reader = _Reader(self.path, len(self._readers))
            self._readers.append(reader)  # before its thread connects: counted once
            try:
                await reader.start()
            except BaseException:
                self._readers.remove(reader)
                reader.executor.shutdown(wait=False)
                raise
        else:
            reader = await idle.get()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(reader.executor, fn, reader.conn)
        finally:  # a cancelled call may still run: the reader's one thread queues the next
            idle.put_nowait(reader)

    async def close(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        readers, self._readers, self._idle = self._readers, [], None
        for reader in readers:
            await asyncio.to_thread(reader.close)
        if self._conn is not None:
            try:
                await self.run(lambda c: None)  # commits the grouped writes
            except sqlite3.Error as exc:  # rolled back: as if the process had ended
                log.warning("commit of grouped writes failed: %s", exc)
        conn, self._conn = self._conn, None
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            await asyncio.to_thread(checkpointer.close)
        if conn is not None:
            await self._submit(conn.close)
        self._executor.shutdown(wait=True)


def _log_failed_commit(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("commit of grouped writes failed: %s", future.exception())


def insert_many(conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``conn.executemany(sql, rows)`` for a one-row ``INSERT ... VALUES (?, ...)``, run
    as INSERTs of many rows each. executemany steps once per row, and each step gives up
    the GIL and takes it back: with another thread busy (an import prepares its next
    block while this one is written) that is a thread switch per row. A statement of
    many rows steps once. Statements come in a few sizes only (:data:`ROWS_PER_INSERT`):
    each size is compiled once and kept in the connection's statement cache, where a
    statement for every odd remainder would take a megabyte each."""
    _insert(conn, sql, rows, ROWS_PER_INSERT)


def insert_full(conn: sqlite3.Connection, sql: str, rows: list[Any]) -> None:
    """:func:`insert_many` for the leading rows that fill statements of the largest size,
    which it then removes from ``rows``: a writer that inserts its rows as it makes them
    holds at most a statement's worth (an import's block, restamped, was a second copy of
    the block), and the rest goes with the final :func:`insert_many`."""
    del rows[: _insert(conn, sql, rows, ROWS_PER_INSERT[:1])]


def _insert(
    conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]], sizes: Sequence[int]
) -> int:
    """Insert rows in statements of ``sizes`` rows (largest first); how many it did."""
    if not rows:
        return 0
    columns = len(rows[0])
    most = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // columns
    first = 0
    for size in sizes:
        size = min(size, most) or 1
        statement = _rows_sql(sql, columns, size)
        while len(rows) - first >= size:
            chunk = rows[first : first + size]
            conn.execute(statement, list(itertools.chain.from_iterable(chunk)))
            first += size
    return first


ROWS_PER_INSERT = (2000, 250, 30, 1)
"""The sizes of the INSERTs :func:`insert_many` runs, largest first (the last must be 1)."""


@cache
def _rows_sql(sql: str, columns: int, count: int) -> str:
    head, values = re.split(r"\bVALUES\b", sql.strip().rstrip(";"), maxsplit=1, flags=re.I)
    row = values.strip()
    if row.count("?") != columns or "?" in head:
        raise ValueError(f"not a one-row INSERT of {columns} values: {sql!r}")
    return f"{head}VALUES {', '.join([row] * count)}"


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn`` in one write transaction (taken at once, so it cannot deadlock)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result
