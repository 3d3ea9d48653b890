"""PostgreSQL operation data store (and the secret table beside it): many workers, many hosts.

- Acquisition is one statement, an ``UPDATE`` of the row a ``SELECT ... ORDER BY
  created_at LIMIT 1 FOR UPDATE SKIP LOCKED`` picked: the oldest runnable job no other
  transaction is taking is leased and its fencing version bumped (and ``restart_count``
  for an expired lease) at once, so concurrent acquirers never wait for each other and
  never share a job.
- Every worker write names its lease version (``WHERE lease_version = $n``); a stale one
  changes nothing and raises ``LeaseLost``.
- A kick-off's dedupe and per-client limit are check-then-insert: they run under a
  transaction-scoped advisory lock on the client (``hashtext(client)``), so two kick-offs of
  one client are serialized while other clients go on in parallel.
- Kick-offs, cancel and pause requests, and jobs released back to ``queued`` are announced
  with ``NOTIFY exportsvc_jobs`` (payload: the job id) when their transaction commits;
  :meth:`PostgresOperationDataStore.listen` hands them to a callback, so an idle worker
  wakes at once instead of at its next poll. Polling stays the safety net: a notification
  can be missed while the listening connection is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta

import asyncpg

from datastore.columns import epoch, insert_params, record_from_row, save_params
from datastore.operations import Job, JobControl, OperationDataStore
from datastore.postgres.db import TRANSIENT, PostgresDatabase, queries
from exportsvc.errors import LeaseLost, StoreError, TooManyJobs
from exportsvc.records import JobRecord, JobStatus

log = logging.getLogger(__name__)

Q = queries("operations.sql")

CHANNEL = "exportsvc_jobs"
_LOST: tuple[type[BaseException], ...] = (*TRANSIENT, asyncpg.InterfaceError)
LISTEN_PING_SECONDS = 30.0
"""How often an idle listening connection is checked (a dead peer may never say so)."""


class PostgresOperationDataStore(OperationDataStore):
    """Job records in PostgreSQL.

    ``database`` is a :class:`PostgresDatabase`, which both stores of a process should
    share (an import writes resources and its checkpoint in one transaction), or a DSN:
    the store then has a pool of its own (``min_size``..``max_size`` connections; with
    ``migrate`` it brings the schema up to date when it opens).
    """

    def __init__(
        self,
        database: PostgresDatabase | str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        migrate: bool = False,
    ) -> None:
        self.db = (
            PostgresDatabase(database, min_size=min_size, max_size=max_size, migrate=migrate)
            if isinstance(database, str)
            else database
        )

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def create_job(
        self, record: Job, children: Sequence[Job] = (), *, max_active_per_client: int
    ) -> tuple[Job, bool]:
        async with self.db.transaction() as conn:
            await conn.execute(Q["lock_client"], record.client)
            existing = await conn.fetchval(Q["find_active"], record.client, record.fingerprint)
            if existing is not None:
                row = await conn.fetchrow(Q["get"], existing)
                assert row is not None
                return _job(row), False
            active = int(await conn.fetchval(Q["count_active"], record.client))
            if active >= max_active_per_client:
                raise TooManyJobs(
                    f"this client already has {active} active jobs "
                    f"(limit {max_active_per_client}); retry when one has finished",
                    headers={"Retry-After": "30"},
                )
            await conn.executemany(Q["insert"], [_insert_args(r) for r in (record, *children)])
            await conn.execute(Q["notify"], record.id)
            row = await conn.fetchrow(Q["get"], record.id)
        assert row is not None
        return _job(row), True

    async def get(self, job_id: str) -> Job | None:
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q["get"], job_id)
        return _job(row) if row else None

    async def children(self, parent_id: str) -> list[Job]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(Q["children"], parent_id)
        return [_job(r) for r in rows]

    async def acquire(self, owner: str, lease_seconds: float, now: datetime) -> Job | None:
        expires = epoch(now + timedelta(seconds=lease_seconds))
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q["acquire"], owner, epoch(now), expires)
        return _job(row) if row else None

    async def heartbeat(
        self, job_id: str, version: int, lease_seconds: float, now: datetime
    ) -> JobControl:
        expires = epoch(now + timedelta(seconds=lease_seconds))
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q["heartbeat"], job_id, version, expires)
        if row is None:
            raise LeaseLost()
        return JobControl(cancel_requested=bool(row[0]), pause_requested=bool(row[1]))

    async def save(self, record: JobRecord) -> None:
        async with self.db.connection() as conn:
            if await conn.fetchval(Q["save"], *save_args(record)) is None:
                raise LeaseLost()
            if record.status == JobStatus.QUEUED:  # released (drain, retry): take it up
                await conn.execute(Q["notify"], record.id)

    async def add_children(self, parent: JobRecord, children: Sequence[Job]) -> None:
        async with self.db.transaction() as conn:
            await conn.executemany(Q["insert"], [_insert_args(r) for r in children])
            if await conn.fetchval(Q["save"], *save_args(parent)) is None:
                raise LeaseLost()  # rolls the inserts back
            await conn.execute(Q["notify"], parent.id)

    async def settle(self, parent_id: str) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(Q["lock_job"], parent_id)
            await conn.execute(Q["settle"], parent_id)

    async def request_pause(self, job_id: str, pause: bool) -> bool:
        async with self.db.transaction() as conn:
            if await conn.fetchval(Q["request_pause"], job_id, pause) is None:
                return False
            await conn.execute(Q["request_pause_children"], job_id, pause)
            await conn.execute(Q["notify"], job_id)
        return True

    async def request_cancel(self, job_id: str) -> bool:
        async with self.db.transaction() as conn:
            if await conn.fetchval(Q["request_cancel"], job_id) is None:
                return False
            await conn.execute(Q["request_cancel_children"], job_id)
            await conn.execute(Q["notify"], job_id)
        return True

    async def list(self, *, client: str | None = None, limit: int = 100) -> list[Job]:
        async with self.db.connection() as conn:
            if client is None:
                rows = await conn.fetch(Q["list_all"], limit)
            else:
                rows = await conn.fetch(Q["list_client"], limit, client)
        return [_job(r) for r in rows]

    # -- wake-ups -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def listen(self, callback: Callable[[str], object]) -> AsyncIterator[None]:
        """Call ``callback(job_id)`` for every job announcement while the block runs.

        The notifications arrive on a connection of their own (not from the pool), kept up
        by a background task that reconnects after a failure. ``callback("")`` means
        "announcements may have been missed" (each time listening starts or resumes): look
        for work. The callback runs on the event loop and must not block. Entering the
        block waits until the first LISTEN is in place (so nothing announced after it is
        missed) and raises ``StoreError`` when that cannot be done.
        """
        ready = asyncio.Event()
        task = asyncio.create_task(self._listen(callback, ready), name="exportsvc-listen")
        waiter = asyncio.create_task(ready.wait())
        try:
            await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # the first connection failed for good: raise it here
            yield
        finally:
            waiter.cancel()
            task.cancel()
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.error("db.listen_failed", exc_info=task.exception())

    async def _listen(self, callback: Callable[[str], object], ready: asyncio.Event) -> None:
        while True:
            try:
                conn = await self.db.connect()
            except StoreError:
                if not ready.is_set():
                    raise  # listen() raises it: the database is not there at all
                log.exception("db.listen_reconnect_failed")
                continue  # connect() already waited, with backoff
            try:
                await _listen_on(conn, callback, ready)
            except _LOST as exc:
                log.warning("db.listen_lost", extra={"error": type(exc).__name__})
            finally:
                await _close(conn)
            await asyncio.sleep(1.0)  # then reconnect (db.connect retries with backoff)

    # -- secrets (ciphertext only; exportsvc.secrets encrypts) -------------------------

    async def put_secret(self, name: str, ciphertext: bytes) -> None:
        async with self.db.connection() as conn:
            await conn.execute(Q["put_secret"], name, ciphertext)

    async def get_secret(self, name: str) -> bytes | None:
        async with self.db.connection() as conn:
            value = await conn.fetchval(Q["get_secret"], name)
        return bytes(value) if value is not None else None

    async def delete_secret(self, name: str) -> None:
        async with self.db.connection() as conn:
            await conn.execute(Q["delete_secret"], name)

    async def claim(self, key: str, expires_at: datetime, now: datetime) -> bool:
        async with self.db.connection() as conn:
            return await conn.fetchval(Q["claim"], key, expires_at, now) is not None


def _job(row: asyncpg.Record) -> Job:
    return record_from_row(tuple(row))


def _insert_args(record: JobRecord) -> tuple[object, ...]:
    p = insert_params(record)
    return (
        p["id"],
        p["kind"],
        p["client"],
        p["fingerprint"],
        p["parent_id"],
        p["status"],
        p["lease_version"],
        p["retry_after"],
        p["created_at"],
        p["record"],
    )


def save_args(record: JobRecord) -> tuple[object, ...]:
    """The arguments of the ``save`` query (shared with the resource store's checkpoint)."""
    p = save_params(record)
    return (
        p["id"],
        p["version"],
        p["status"],
        p["owner"],
        p["expires"],
        p["retry_after"],
        p["restart_count"],
        p["record"],
    )


async def _listen_on(
    conn: asyncpg.Connection[asyncpg.Record],
    callback: Callable[[str], object],
    ready: asyncio.Event,
) -> None:
    """LISTEN on ``conn`` until it is lost (a closed socket, or a failed ping)."""

    def notified(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        callback(str(payload))

    lost = asyncio.Event()
    conn.add_termination_listener(lambda _conn: lost.set())
    await conn.add_listener(CHANNEL, notified)
    log.info("db.listening", extra={"channel": CHANNEL})
    ready.set()
    callback("")
    while not lost.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lost.wait(), LISTEN_PING_SECONDS)
        if not lost.is_set():
            await conn.fetchval("SELECT 1", timeout=LISTEN_PING_SECONDS)


async def _close(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    if conn.is_closed():
        return
    try:
        await asyncio.wait_for(conn.close(), 5.0)
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except Exception:  # nothing left to clean up but the socket
        conn.terminate()
