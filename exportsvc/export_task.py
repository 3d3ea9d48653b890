"""The export tasks (DESIGN.md sections 4 and 8).

``ExportPlanTask`` runs once per export: it writes the error file of ignored input, splits
the export into work items (one per resource type; sequence ranges of
``EXPORTSVC_EXPORT_ITEM_RESOURCES`` for large types) and hands them to the queue in one
fenced transaction. ``ExportItemTask`` runs an item from its last checkpoint: read a
page by continuation point, append each resource's stored bytes to the current file
(rolling at ``max_file_bytes``; for a type with a ``_typeFilter`` or ``_elements`` the
page is parsed first, filtered and subsetted: :func:`page_transform`), and every N pages
or T seconds commit every touched file and only then persist the checkpoint
(``exportsvc.tasks``). Items share the export's folder; each owns the files named after
its scope.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import orjson

from datastore.resources import ExportQuery, ResourceStore, Row
from exportsvc.errors import InvalidRequest
from exportsvc.fhir.compartment import PATIENT_COMPARTMENT
from exportsvc.fhir.group import member_ids
from exportsvc.records import (
    ExportItemRecord,
    ExportJobRecord,
    ExportKind,
    ExportRequest,
    JobStatus,
    OutputFile,
    utcnow,
)
from exportsvc.search.elements import elements_for, subset
from exportsvc.search.matcher import compile_filters
from exportsvc.tasks import JobSignals, JobTask, outcome_line, shielded

__all__ = ["ExportItemTask", "ExportPlanTask", "JobSignals", "export_query", "shielded"]
ERRORS_SCOPE = "OperationOutcome"


async def export_query(
    resources: ResourceStore, request: ExportRequest, snapshot_seq: int, type_: str
) -> ExportQuery:
    """What the export reads of ``type_``: the store as of the snapshot, filtered."""
    compartment = request.kind != ExportKind.SYSTEM
    patients: list[str] | None = request.patients or None
    if request.kind == ExportKind.GROUP:
        group = await resources.read("Group", request.group_id or "", snapshot_seq)
        if group is None:
            raise InvalidRequest(f"Group/{request.group_id} does not exist")
        members = member_ids(group)
        patients = [m for m in members if not request.patients or m in set(request.patients)]
    since, until, ids = request.since, request.until, None
    matcher = compile_filters(request.type_filters).get(type_)
    if matcher is not None:  # what of the _typeFilter the store's columns can decide
        bounds = matcher.bounds
        if bounds.since is not None and (since is None or bounds.since > since):
            since = bounds.since
        if bounds.until is not None and (until is None or bounds.until < until):
            until = bounds.until
        ids = bounds.ids
    return ExportQuery(
        type=type_,
        snapshot_seq=snapshot_seq,
        since=since,
        until=until,
        compartment=compartment,
        patients=patients if compartment else None,
        ids=ids,
    )


PageTransform = Callable[[Sequence[Row]], list[bytes]]


def page_transform(request: ExportRequest, type_: str) -> PageTransform | None:
    """What the worker does to a page of ``type_`` beyond copying the stored bytes: the
    rest of the ``_typeFilter`` (evaluated on the parsed resource) and ``_elements``.
    None when neither applies: the stored bytes are copied unparsed."""
    matcher = compile_filters(request.type_filters).get(type_)
    keep = elements_for(request.elements, type_)
    if matcher is None and keep is None:
        return None

    def transform(rows: Sequence[Row]) -> list[bytes]:
        out: list[bytes] = []
        for row in rows:
            resource = orjson.loads(row.raw)
            if matcher is not None and not matcher.matches(resource):
                continue
            out.append(row.raw if keep is None else orjson.dumps(subset(resource, keep)))
        return out

    return transform


class ExportPlanTask(JobTask[ExportJobRecord]):
    @property
    def container(self) -> str | None:
        return self.record.request.container

    @property
    def scope(self) -> str | None:
        return ERRORS_SCOPE

    @property
    def cleanup_scope(self) -> str | None:
        return None  # a cancelled export loses its whole folder, every item's files too

    def _progress(self) -> dict[str, Any]:
        return {"items": self.record.item_count}

    async def _run(self) -> None:
        record = self.record
        request = record.request
        if request.ignored and not record.output:
            errors = self._new_file(ERRORS_SCOPE, role="error")
            await self.dest.start_file(errors)
            lines = b"".join(outcome_line(m) for m in request.ignored)
            await self._write(errors, lines, len(request.ignored))
        items = await self._plan()
        touched = [f for f in record.output if f.name in self._touched]
        committed = {f.name: f for f in await self.dest.commit(touched)}
        record.output = [committed.get(f.name, f) for f in record.output]
        secret = self.destinations.secret_for(request.container)
        for item in items:
            await self.secrets.put(item.secret_name or "", secret)
        record.planned = True
        record.item_count = len(items)
        record.total_estimate = sum(i.total_estimate for i in items)
        record.started_at = utcnow()
        record.status = JobStatus.RUNNING  # no lease: it follows its items from now on
        record.lease.owner = None
        record.lease.expires_at = None
        await shielded(self.operations.add_children(record, items))
        self.signals.released.set()  # the lease is given back: no heartbeat owes it
        await self._forget_secret()
        await self.operations.settle(record.id)  # an export of nothing is complete

    async def _plan(self) -> list[ExportItemRecord]:
        record, request = self.record, self.record.request
        types = request.types or await self.resources.types(record.snapshot_seq)
        if request.kind != ExportKind.SYSTEM:
            types = [t for t in types if t in PATIENT_COMPARTMENT]
        items: list[ExportItemRecord] = []
        for type_ in types:
            bounds = await self.resources.seq_bounds(type_, record.snapshot_seq)
            if bounds is None:
                continue
            query = await export_query(self.resources, request, record.snapshot_seq, type_)
            count = await self.resources.count(query)
            if count == 0:
                continue
            parts = math.ceil(count / self.settings.export_item_resources)
            low, high = bounds[0] - 1, bounds[1]
            step = math.ceil((high - low) / parts)
            for part in range(parts):
                after, last = low + part * step, min(low + (part + 1) * step, high)
                items.append(self._item(type_, part if parts > 1 else None, after, last))
                items[-1].total_estimate = count // parts + (part < count % parts)
        for n, item in enumerate(items):  # distinct, increasing: leased in plan order
            item.created_at = record.created_at + timedelta(microseconds=n + 1)
        return items

    def _item(self, type_: str, part: int | None, after: int, last: int) -> ExportItemRecord:
        record = self.record
        item_id = uuid.uuid4().hex
        return ExportItemRecord(
            id=item_id,
            client=record.client,
            parent_id=record.id,
            secret_name=f"export-{item_id}",
            request=record.request,
            transaction_time=record.transaction_time,
            snapshot_seq=record.snapshot_seq,
            type=type_,
            scope=type_ if part is None else f"{type_}.{part:03d}",
            seq_after=after,
            seq_max=last,
            after_seq=after,
        )


class ExportItemTask(JobTask[ExportItemRecord]):
    @property
    def container(self) -> str | None:
        return self.record.request.container

    @property
    def folder(self) -> str:
        return self.record.parent_id or self.record.id

    @property
    def scope(self) -> str | None:
        return self.record.scope

    def _progress(self) -> dict[str, Any]:
        return {"pages_read": self.record.pages_read, "resources": self.record.resources_done}

    async def _run(self) -> None:
        record = self.record
        if record.started_at is None:
            record.started_at = utcnow()
        query = await export_query(self.resources, record.request, record.snapshot_seq, record.type)
        transform = page_transform(record.request, record.type)
        pages_since_commit, last_commit = 0, time.monotonic()
        while not record.done:
            if await self._stop_requested():
                return
            page = await self.resources.page(query, record.after_seq, self.settings.page_size)
            rows = [row for row in page.rows if row.seq <= record.seq_max]
            if transform is None:
                await self._append([row.raw for row in rows])
            else:  # parsing a page is CPU work: off the event loop
                await self._append(await asyncio.to_thread(transform, rows))
            # The continuation point moves past every row read, written or filtered out.
            record.after_seq = rows[-1].seq if rows else record.after_seq
            record.done = page.last or len(rows) < len(page.rows)
            record.resources_done += len(rows)
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

    def _current_file(self) -> OutputFile | None:
        return self.record.output[-1] if self.record.output else None

    async def _append(self, lines: Sequence[bytes]) -> None:
        """Append resources as ndjson, rolling to a new file at ``max_file_bytes``."""
        limit = self.settings.max_file_bytes
        current = self._current_file()
        chunk: list[bytes] = []
        pending = 0
        for raw in lines:
            size = len(raw) + 1
            used = self._sizes[current.name] + pending if current is not None else 0
            if current is None or (used and used + size > limit):
                if current is not None and chunk:
                    await self._flush(current, chunk)
                    chunk, pending = [], 0
                current = self._new_file(self.record.type)
                await self.dest.start_file(current)
            chunk.append(raw)
            pending += size
        if current is not None and chunk:
            await self._flush(current, chunk)

    async def _flush(self, file: OutputFile, chunk: list[bytes]) -> None:
        count = len(chunk)
        chunk.append(b"")
        await self._write(file, b"\n".join(chunk), count)
