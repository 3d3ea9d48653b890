"""ExportJobTask: runs one leased export job from its last checkpoint (DESIGN.md section 4).

The loop: read a page by continuation point, append each resource's stored bytes to the
current file of its type (rolling at ``max_file_bytes``), and every N pages or T seconds
commit every touched file and only then persist the checkpoint (``exportsvc.tasks``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from datastore.resources import ExportQuery, Row
from exportsvc.errors import InvalidRequest
from exportsvc.fhir.compartment import PATIENT_COMPARTMENT
from exportsvc.fhir.group import member_ids
from exportsvc.records import ExportJobRecord, ExportKind, OutputFile, TypeProgress, utcnow
from exportsvc.tasks import JobSignals, JobTask, outcome_line, shielded

__all__ = ["ExportJobTask", "JobSignals", "shielded"]


class ExportJobTask(JobTask[ExportJobRecord]):
    _group_members: list[str] | None = None

    @property
    def container(self) -> str | None:
        return self.record.request.container

    def _progress(self) -> dict[str, Any]:
        return {"pages_read": self.record.pages_read, "resources": self.record.resources_done}

    async def _run(self) -> None:
        if not self.record.progress:
            await self._prepare()
        await self._export()

    # -- preparation ------------------------------------------------------------------

    async def _members(self) -> list[str] | None:
        request = self.record.request
        if request.kind != ExportKind.GROUP:
            return request.patients or None
        if self._group_members is None:
            group = await self.resources.read(
                "Group", request.group_id or "", self.record.snapshot_seq
            )
            if group is None:
                raise InvalidRequest(f"Group/{request.group_id} does not exist")
            members = member_ids(group)
            if request.patients:
                members = [m for m in members if m in set(request.patients)]
            self._group_members = members
        return self._group_members

    async def _query(self, type_: str) -> ExportQuery:
        request = self.record.request
        compartment = request.kind != ExportKind.SYSTEM
        return ExportQuery(
            type=type_,
            snapshot_seq=self.record.snapshot_seq,
            since=request.since,
            until=request.until,
            compartment=compartment,
            patients=await self._members() if compartment else None,
        )

    async def _prepare(self) -> None:
        """First run: fix the list of types, estimate the total, report ignored input."""
        record = self.record
        request = record.request
        types = request.types or await self.resources.types(record.snapshot_seq)
        if request.kind != ExportKind.SYSTEM:
            types = [t for t in types if t in PATIENT_COMPARTMENT]
        record.progress = [TypeProgress(type=t) for t in types]
        total = 0
        for t in types:
            total += await self.resources.count(await self._query(t))
        record.total_estimate = total
        record.started_at = utcnow()
        if request.ignored:
            errors = self._new_file("OperationOutcome", role="error")
            await self.dest.start_file(errors)
            lines = b"".join(outcome_line(m) for m in request.ignored)
            await self._write(errors, lines, len(request.ignored))
        await self._checkpoint()

    # -- the loop ---------------------------------------------------------------------

    async def _export(self) -> None:
        record = self.record
        pages_since_commit, last_commit = 0, time.monotonic()
        for progress in record.progress:
            query = await self._query(progress.type) if not progress.done else None
            while query is not None and not progress.done:
                if await self._stop_requested():
                    return
                page = await self.resources.page(query, progress.after_seq, self.settings.page_size)
                await self._append(progress.type, page.rows)
                progress.after_seq = page.next_after
                progress.count += len(page.rows)
                progress.done = page.last
                record.resources_done += len(page.rows)
                record.pages_read += 1
                pages_since_commit += 1
                if (
                    pages_since_commit >= self.settings.commit_every_pages
                    or time.monotonic() - last_commit >= self.settings.commit_interval_seconds
                ):
                    await self._checkpoint()
                    pages_since_commit, last_commit = 0, time.monotonic()
        if await self._stop_requested():
            return
        await self._checkpoint()
        await self._complete()

    def _current_file(self, type_: str) -> OutputFile | None:
        for f in reversed(self.record.output):
            if f.type == type_ and f.role == "output":
                return f
        return None

    async def _append(self, type_: str, rows: Sequence[Row]) -> None:
        """Append rows as ndjson, rolling to a new file at ``max_file_bytes``."""
        limit = self.settings.max_file_bytes
        current = self._current_file(type_)
        chunk: list[bytes] = []
        pending = 0
        for row in rows:
            size = len(row.raw) + 1
            used = self._sizes[current.name] + pending if current is not None else 0
            if current is None or (used and used + size > limit):
                if current is not None and chunk:
                    await self._flush(current, chunk)
                    chunk, pending = [], 0
                current = self._new_file(type_)
                await self.dest.start_file(current)
            chunk.append(row.raw)
            pending += size
        if current is not None and chunk:
            await self._flush(current, chunk)

    async def _flush(self, file: OutputFile, chunk: list[bytes]) -> None:
        count = len(chunk)
        chunk.append(b"")
        await self._write(file, b"\n".join(chunk), count)
