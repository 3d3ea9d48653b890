"""An asyncpg connection pool, the named queries and the numbered migrations.

Named queries live in ``sql/*.sql`` (``-- name: x`` sections, as for SQLite) and are
prepared and cached per connection by asyncpg. Migrations are the numbered files in
``sql/migrations``, recorded (with a checksum) in ``schema_migrations``; :meth:`migrate`
applies the missing ones in one transaction under an advisory lock, so any number of
processes may start at once. A service that does not migrate refuses to start on a schema
that lacks one of its migrations (:meth:`check_schema`); a schema with migrations this code
does not know is accepted with a warning (migrations are additive: an older process runs
beside a newer one during a rolling upgrade).

Transient connection failures (the server restarting, refusing connections, a network
error) are retried with tenacity where connections are made and taken from the pool, and
nowhere else: a query that fails is not run again behind the caller's back. What still
fails surfaces as :class:`~exportsvc.errors.StoreError`, which the worker treats as
retriable.

asyncpg prepares statements on the server: behind a pooler, use session pooling.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from exportsvc.errors import StoreError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
"""A connection taken from the pool (asyncpg's proxy; generic only in the stubs)."""

_SQL = resources.files("datastore.postgres") / "sql"
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d+)_(\w+)\.sql$")

TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError is one too
    asyncpg.PostgresConnectionError,  # class 08, the connection closed mid-operation
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)
"""Failures of the connection itself, not of the statement: worth another connection."""


class SchemaError(StoreError):
    """The database schema does not match this version of exportsvc."""

    status = 500
    retriable = False


@cache
def queries(filename: str) -> dict[str, str]:
    """The named queries of ``sql/<filename>``."""
    text = (_SQL / filename).read_text()
    parts = _NAME.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2], strict=True)}


Q = queries("schema.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    number: int
    name: str
    script: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.script.encode()).hexdigest()


@cache
def migrations() -> tuple[Migration, ...]:
    """The migrations this code ships, in order."""
    found = []
    for entry in (_SQL / "migrations").iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.number)
    numbers = [m.number for m in found]
    if len(set(numbers)) != len(numbers):
        raise RuntimeError(f"two migrations share a number: {numbers}")
    return tuple(found)


def _retrying(seconds: float) -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        stop=stop_after_delay(seconds),
        wait=wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.1),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )


class PostgresDatabase:
    """A pool of connections to one database.

    With ``migrate`` :meth:`open` brings the schema up to date; without it, it checks the
    schema and refuses an out-of-date one (run the migrations first, from one place).
    Both stores of a process share one, so an import batch writes its resources and its
    checkpoint in one transaction; ``open`` and ``close`` count their callers.
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        migrate: bool = False,
        connect_timeout: float = 10.0,
        retry_seconds: float = 30.0,
        command_timeout: float | None = None,
        application_name: str = "exportsvc",
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.auto_migrate = migrate
        self.connect_timeout = connect_timeout
        self.retry_seconds = retry_seconds
        self.command_timeout = command_timeout
        self.server_settings = {
            "application_name": application_name,
            # Plan every execution of a prepared statement with its arguments: an export
            # page of a rare type must use the (type, seq) index, and a generic plan made
            # for a common type would scan the whole sequence instead. Planning these
            # small queries costs far less than one page.
            "plan_cache_mode": "force_custom_plan",
        }
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._users = 0
        self._opening = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._opening:
            await self._open()

    async def _open(self) -> None:
        self._users += 1
        if self._pool is not None:
            return
        try:
            async for attempt in _retrying(self.retry_seconds):
                with attempt:
                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=self.min_size,
                        max_size=self.max_size,
                        timeout=self.connect_timeout,
                        command_timeout=self.command_timeout,
                        server_settings=self.server_settings,
                    )
        except TRANSIENT as exc:
            self._users -= 1
            raise StoreError(f"cannot connect to PostgreSQL: {_describe(exc)}") from exc
        except BaseException:
            self._users -= 1
            raise
        try:
            if self.auto_migrate:
                await self.migrate()
            else:
                await self.check_schema()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        self._users = 0
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise RuntimeError("the PostgreSQL database is not open")
        return self._pool

    # -- connections ----------------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; connection failures inside become ``StoreError``."""
        pool = self.pool
        try:
            conn: Connection | None = None
            async for attempt in _retrying(self.retry_seconds):
                with attempt:
                    conn = await pool.acquire()
            assert conn is not None
            try:
                yield conn
            finally:
                await pool.release(conn)
        except TRANSIENT as exc:
            raise StoreError(f"PostgreSQL connection failed: {_describe(exc)}") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A pooled connection inside one transaction (READ COMMITTED)."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def connect(self) -> asyncpg.Connection[asyncpg.Record]:
        """A connection of its own, outside the pool (for LISTEN); the caller closes it."""
        try:
            async for attempt in _retrying(self.retry_seconds):
                with attempt:
                    return await asyncpg.connect(
                        self.dsn,
                        timeout=self.connect_timeout,
                        server_settings=self.server_settings,
                    )
        except TRANSIENT as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {_describe(exc)}") from exc
        raise AssertionError("unreachable")

    # -- schema ---------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply the missing migrations in one transaction; the numbers applied."""
        done: list[int] = []
        async with self.transaction() as conn:
            await conn.execute(Q["lock_migrations"])  # released at commit
            await conn.execute(Q["create_migrations_table"])
            applied = await _applied(conn)
            _verify_checksums(applied)
            for migration in migrations():
                if migration.number in applied:
                    continue
                await conn.execute(migration.script)
                await conn.execute(
                    Q["record_migration"], migration.number, migration.name, migration.checksum
                )
                done.append(migration.number)
        for number in done:
            log.info("db.migrated", extra={"migration": number})
        return done

    async def check_schema(self) -> None:
        """Raise :class:`SchemaError` unless every migration of this code is applied."""
        async with self.connection() as conn:
            exists = await conn.fetchval(Q["migrations_table_exists"])
            applied = await _applied(conn) if exists else {}
        _verify_checksums(applied)
        missing = [m for m in migrations() if m.number not in applied]
        if missing:
            names = ", ".join(f"{m.number:04d}_{m.name}" for m in missing)
            raise SchemaError(
                f"the PostgreSQL schema is out of date: migrations {names} are not applied; "
                "apply them (`exportsvc migrate`) before starting this version"
            )
        known = {m.number for m in migrations()}
        newer = sorted(set(applied) - known)
        if newer:
            log.warning("db.schema_newer", extra={"migrations": newer})


async def _applied(conn: Connection) -> dict[int, tuple[str, str]]:
    rows = await conn.fetch(Q["applied"])
    return {int(r["number"]): (str(r["name"]), str(r["checksum"])) for r in rows}


def _verify_checksums(applied: dict[int, tuple[str, str]]) -> None:
    for migration in migrations():
        found = applied.get(migration.number)
        if found is not None and found[1] != migration.checksum:
            raise SchemaError(
                f"migration {migration.number:04d}_{migration.name} was applied from a "
                "different file than this version ships; the schema cannot be trusted"
            )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
