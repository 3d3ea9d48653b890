"""SQLite operation data store (and the secret table beside it)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from datastore.columns import epoch, insert_params, record_from_row, save_params
from datastore.operations import Job, JobControl, OperationDataStore
from datastore.sqlite.db import SqliteDatabase, queries, transaction
from exportsvc.errors import LeaseLost, TooManyJobs
from exportsvc.records import JobRecord

Q = queries("operations.sql")


class SqliteOperationDataStore(OperationDataStore):
    def __init__(self, db: SqliteDatabase | Path | str) -> None:
        self.db = db if isinstance(db, SqliteDatabase) else SqliteDatabase(db)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def create_job(
        self, record: Job, children: Sequence[Job] = (), *, max_active_per_client: int
    ) -> tuple[Job, bool]:
        key = {"client": record.client, "fingerprint": record.fingerprint}

        def create(conn: sqlite3.Connection) -> tuple[str, bool]:
            existing = conn.execute(Q["find_active"], key).fetchone()
            if existing:
                return existing[0], False
            active = conn.execute(Q["count_active"], key).fetchone()[0]
            if active >= max_active_per_client:
                raise TooManyJobs(
                    f"this client already has {active} active jobs "
                    f"(limit {max_active_per_client}); retry when one has finished",
                    headers={"Retry-After": "30"},
                )
            conn.executemany(Q["insert"], [insert_params(r) for r in (record, *children)])
            return record.id, True

        job_id, created = await self.db.run(lambda c: transaction(c, create))
        stored = await self.get(job_id)
        assert stored is not None
        return stored, created

    async def get(self, job_id: str) -> Job | None:
        # Status reads use the read connections: on the writer's thread every poll would
        # end an import's group of writes early (SqliteDatabase.run_grouped).
        row = await self.db.read(lambda c: c.execute(Q["get"], {"id": job_id}).fetchone())
        return record_from_row(row) if row else None

    async def children(self, parent_id: str) -> list[Job]:
        rows = await self.db.read(lambda c: c.execute(Q["children"], {"id": parent_id}).fetchall())
        return [record_from_row(r) for r in rows]

    async def acquire(self, owner: str, lease_seconds: float, now: datetime) -> Job | None:
        params = {
            "owner": owner,
            "now": epoch(now),
            "expires": epoch(now + timedelta(seconds=lease_seconds)),
        }
        row = await self.db.run(
            lambda c: transaction(c, lambda t: t.execute(Q["acquire"], params).fetchone())
        )
        return record_from_row(row) if row else None

    async def heartbeat(
        self, job_id: str, version: int, lease_seconds: float, now: datetime
    ) -> JobControl:
        params = {
            "id": job_id,
            "version": version,
            "expires": epoch(now + timedelta(seconds=lease_seconds)),
        }
        row = await self.db.run(
            lambda c: transaction(c, lambda t: t.execute(Q["heartbeat"], params).fetchone())
        )
        if row is None:
            raise LeaseLost()
        return JobControl(cancel_requested=bool(row[0]), pause_requested=bool(row[1]))

    async def save(self, record: JobRecord) -> None:
        params = save_params(record)
        count = await self.db.run(lambda c: c.execute(Q["save"], params).rowcount)
        if count != 1:
            raise LeaseLost()

    async def add_children(self, parent: JobRecord, children: Sequence[Job]) -> None:
        inserts = [insert_params(r) for r in children]
        params = save_params(parent)

        def add(conn: sqlite3.Connection) -> None:
            conn.executemany(Q["insert"], inserts)
            if conn.execute(Q["save"], params).rowcount != 1:
                raise LeaseLost()  # rolls the inserts back

        await self.db.run(lambda c: transaction(c, add))

    async def settle(self, parent_id: str) -> None:
        await self.db.run(lambda c: c.execute(Q["settle"], {"id": parent_id}))

    async def request_pause(self, job_id: str, pause: bool) -> bool:
        params = {"id": job_id, "pause": int(pause)}

        def pause_all(conn: sqlite3.Connection) -> bool:
            found = conn.execute(Q["request_pause"], params).rowcount == 1
            if found:
                conn.execute(Q["request_pause_children"], params)
            return found

        return await self.db.run(lambda c: transaction(c, pause_all))

    async def request_cancel(self, job_id: str) -> bool:
        def cancel(conn: sqlite3.Connection) -> bool:
            found = conn.execute(Q["request_cancel"], {"id": job_id}).rowcount == 1
            if found:
                conn.execute(Q["request_cancel_children"], {"id": job_id})
            return found

        return await self.db.run(lambda c: transaction(c, cancel))

    async def list(self, *, client: str | None = None, limit: int = 100) -> list[Job]:
        params: dict[str, object] = {"limit": limit, "client": client}
        sql = Q["list_all"] if client is None else Q["list_client"]
        rows = await self.db.read(lambda c: c.execute(sql, params).fetchall())
        return [record_from_row(r) for r in rows]

    # -- secrets (ciphertext only; exportsvc.secrets encrypts) -------------------------

    async def put_secret(self, name: str, ciphertext: bytes) -> None:
        params = {"name": name, "ciphertext": ciphertext}
        await self.db.run(lambda c: c.execute(Q["put_secret"], params))

    async def get_secret(self, name: str) -> bytes | None:
        row = await self.db.run(lambda c: c.execute(Q["get_secret"], {"name": name}).fetchone())
        return bytes(row[0]) if row else None

    async def delete_secret(self, name: str) -> None:
        await self.db.run(lambda c: c.execute(Q["delete_secret"], {"name": name}))

    async def claim(self, key: str, expires_at: datetime, now: datetime) -> bool:
        params = {"key": key, "expires_at": epoch(expires_at), "now": epoch(now)}

        def claim(conn: sqlite3.Connection) -> bool:
            conn.execute(Q["purge_claims"], params)
            return bool(conn.execute(Q["claim"], params).rowcount == 1)

        return await self.db.run(lambda c: transaction(c, claim))
