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
its scope. With ``_since``, a type's deletions in the window are an item of their own
(``content="deleted"``), written as transaction Bundles to ``deleted[]`` files.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from datastore.resources import (
    BlockQuery,
    BlockRow,
    Deletion,
    ExportQuery,
    Page,
    ResourceStore,
    ndjson_lines,
)
from datastore.versioning import fhir_instant
from exportsvc.associated import AssociatedProvenance
from exportsvc.errors import InvalidRequest
from exportsvc.fhir.compartment import PATIENT_COMPARTMENT
from exportsvc.fhir.group import member_ids
from exportsvc.fhir.provenance import PROVENANCE_VALUES
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
ItemContent = Literal["resources", "deleted", "provenance", "organized"]


async def export_query(
    resources: ResourceStore, request: ExportRequest, snapshot_seq: int, type_: str
) -> ExportQuery:
    """What the export reads of ``type_``: the store as of the snapshot, filtered."""
    compartment = request.kind != ExportKind.SYSTEM or request.organize_by is not None
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


PageTransform = Callable[[Sequence[bytes]], list[bytes]]


def page_transform(request: ExportRequest, type_: str) -> PageTransform | None:
    """What the worker does to a page of ``type_`` beyond copying the stored bytes: the
    rest of the ``_typeFilter`` (evaluated on the parsed resource) and ``_elements``.
    None when neither applies: the stored bytes are copied unparsed."""
    matcher = compile_filters(request.type_filters).get(type_)
    keep = elements_for(request.elements, type_)
    if matcher is None and keep is None:
        return None

    def transform(raws: Sequence[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for raw in raws:
            resource = orjson.loads(raw)
            if matcher is not None and not matcher.matches(resource):
                continue
            out.append(raw if keep is None else orjson.dumps(subset(resource, keep)))
        return out

    return transform


def deletion_bundle(type_: str, deletion: Deletion) -> bytes:
    """A ``deleted[]`` line: a transaction Bundle with the resource's DELETE entry. Its id
    and content depend only on the stored deletion, so a resume writes the same bytes."""
    moment = datetime.fromtimestamp(deletion.deleted_at / 1_000_000, UTC)
    bundle = {
        "resourceType": "Bundle",
        "id": f"deleted-{deletion.seq}",
        "meta": {"lastUpdated": fhir_instant(moment)},
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": f"{type_}/{deletion.id}"}}],
    }
    return orjson.dumps(bundle)


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
        if request.kind != ExportKind.SYSTEM or request.organize_by:
            types = [t for t in types if t in PATIENT_COMPARTMENT]
        with_provenance = bool(PROVENANCE_VALUES & set(request.associated))
        if with_provenance:  # the associated Provenance are an item of their own, below
            types = [t for t in types if t != "Provenance"]
        items: list[ExportItemRecord] = []
        blocks = 0
        # Each type's bounds and counts at once: the store reads them in parallel where
        # it can (SQLite: a read-only connection per worker slot).
        measured = await asyncio.gather(*(self._measure(type_) for type_ in types))
        for type_, bounds, count, deleted in measured:
            if bounds is None:
                continue
            parts = math.ceil(count / self.settings.export_item_resources)
            if request.organize_by:  # every type goes into the one item of blocks
                blocks, parts = blocks + count, 0
            low, high = bounds[0] - 1, bounds[1]
            step = math.ceil((high - low) / parts) if parts else 0
            for part in range(parts):
                after, last = low + part * step, min(low + (part + 1) * step, high)
                items.append(self._item(type_, part if parts > 1 else None, after, last))
                items[-1].total_estimate = count // parts + (part < count % parts)
            if deleted:  # deleted[] (with _since): one item per type with deletions
                items.append(self._item(type_, None, low, high, content="deleted"))
                items[-1].total_estimate = deleted
        if blocks:  # before the deletions: its files are the output
            items.insert(
                0, self._item("Patient", None, 0, record.snapshot_seq, content="organized")
            )
            items[0].total_estimate = blocks
        bounds = await self.resources.seq_bounds("Provenance", record.snapshot_seq)
        if with_provenance and bounds is not None:
            every = await self.resources.count(ExportQuery("Provenance", record.snapshot_seq))
            item = self._item("Provenance", None, bounds[0] - 1, bounds[1], content="provenance")
            item.total_estimate = every  # at most: those associated are known at the end
            items.append(item)
        if not request.partial_manifests:
            # Largest first: workers lease items in plan order, and the export ends when
            # its last item does, so the long ones must not wait behind the short ones.
            # (Partial manifests keep the order above: their first page comes sooner.)
            items.sort(key=lambda item: -item.total_estimate)
        for n, item in enumerate(items):  # distinct, increasing: leased in plan order
            item.created_at = record.created_at + timedelta(microseconds=n + 1)
        return items

    async def _measure(self, type_: str) -> tuple[str, tuple[int, int] | None, int, int]:
        """``type_``'s sequence bounds, count and (with ``_since``) deletions."""
        record, request = self.record, self.record.request
        bounds = await self.resources.seq_bounds(type_, record.snapshot_seq)
        if bounds is None:
            return type_, None, 0, 0
        query = await export_query(self.resources, request, record.snapshot_seq, type_)
        count = await self.resources.count(query)
        since = request.since is not None
        deleted = await self.resources.count_deletions(query) if since else 0
        return type_, bounds, count, deleted

    def _item(
        self,
        type_: str,
        part: int | None,
        after: int,
        last: int,
        *,
        content: ItemContent = "resources",
    ) -> ExportItemRecord:
        record = self.record
        item_id = uuid.uuid4().hex
        scope = type_ if part is None else f"{type_}.{part:03d}"
        if content == "deleted":
            scope = f"{type_}.deleted"
        elif content == "organized":
            scope = "Patient.blocks"
        return ExportItemRecord(
            id=item_id,
            client=record.client,
            parent_id=record.id,
            secret_name=f"export-{item_id}",
            request=record.request,
            transaction_time=record.transaction_time,
            snapshot_seq=record.snapshot_seq,
            type=type_,
            scope=scope,
            seq_after=after,
            seq_max=last,
            after_seq=after,
            content=content,
        )


class ExportItemTask(JobTask[ExportItemRecord]):
    _provenance: AssociatedProvenance | None = None
    _pages_since_commit = 0
    _last_commit = 0.0

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
        self._last_commit = time.monotonic()
        if record.content == "organized":
            await self._run_blocks()
            return
        query = await export_query(self.resources, record.request, record.snapshot_seq, record.type)
        query = dataclasses.replace(query, last_seq=record.seq_max)
        transform = page_transform(record.request, record.type)
        if record.content == "provenance":
            self._provenance = AssociatedProvenance(self.resources, record.request, query)
            query = self._provenance.query
            await self._provenance.prepare(self.settings.page_size)
        # The next page is read while this one is written: the store and the destination
        # work at the same time. A page read ahead is written only after the pages before
        # it; a stop drops it unwritten (no checkpoint covers it).
        ahead: asyncio.Future[Page] | None = None
        try:
            while not record.done:
                if await self._stop_requested():
                    return
                page = await (ahead or self._read(query, record.after_seq))
                ahead = (
                    None if page.last else asyncio.ensure_future(self._read(query, page.next_after))
                )
                data, count = page.ndjson, page.count
                if transform is not None or self._provenance is not None:
                    lines = page.raws
                    if transform is not None:  # parsing is CPU work: off the event loop
                        lines = await asyncio.to_thread(transform, lines)
                    if self._provenance is not None:
                        lines = await self._provenance.select(lines)
                    data, count = ndjson_lines(lines), len(lines)
                await self._append(data, count)
                # The continuation point moves past every row read, written or filtered out.
                record.after_seq = page.next_after
                record.done = page.last
                record.resources_done += page.count
                await self._page_done()
        finally:
            if ahead is not None:
                await _drop(ahead)
        if await self._stop_requested():
            return
        await self._checkpoint()
        await self._complete()

    async def _page_done(self) -> None:
        """A page is written: checkpoint every ``commit_every_pages`` pages or
        ``commit_interval_seconds``, whichever comes first."""
        self.record.pages_read += 1
        self._pages_since_commit += 1
        settings = self.settings
        if (
            self._pages_since_commit >= settings.commit_every_pages
            or time.monotonic() - self._last_commit >= settings.commit_interval_seconds
        ):
            await self._checkpoint()
            self._pages_since_commit, self._last_commit = 0, time.monotonic()

    async def _read(self, query: ExportQuery, after: int) -> Page:
        """The page after the continuation point ``after``: the stored bytes of each
        resource, or for a deletions item each deletion's transaction Bundle."""
        limit = self.settings.page_size
        if self.record.content != "deleted":
            return await self.resources.page(query, after, limit)
        deletions = await self.resources.deletions(query, after, limit)
        rows = deletions.rows
        bundles = [deletion_bundle(query.type, d) for d in rows]
        return Page.of(bundles, rows[-1].seq if rows else after, deletions.last)

    def _current_file(self) -> OutputFile | None:
        return self.record.output[-1] if self.record.output else None

    async def _append(self, data: bytes, count: int) -> None:
        """Append ``count`` ndjson lines (each ending in a newline), rolling to a new file
        at ``max_file_bytes``. Usually all of it fits: written as it is, not copied."""
        limit = self.settings.max_file_bytes
        current = self._current_file()
        start = 0
        while start < len(data):
            if current is None:
                current = await self._start_file()
            used = self._sizes[current.name]
            end = len(data)
            if used + end - start > limit:  # the whole lines that fit, if any
                end = data.rfind(b"\n", start, start + limit - used) + 1
                if end <= start:
                    if used:
                        current = None  # full: the line starts the next file
                        continue
                    end = data.index(b"\n", start) + 1  # a line alone over the limit
            if start == 0 and end == len(data):
                await self._write(current, data, count)
            else:
                chunk = data[start:end]
                await self._write(current, chunk, chunk.count(b"\n"))
            start = end

    async def _start_file(self) -> OutputFile:
        if self.record.content == "deleted":
            file = self._new_file("Bundle", role="deleted")
        else:
            file = self._new_file(self.record.type)
        await self.dest.start_file(file)
        return file

    async def _flush(self, file: OutputFile, lines: Sequence[bytes]) -> None:
        """Write ``lines`` to ``file`` as ndjson: one join, one copy of the bytes."""
        await self._write(file, ndjson_lines(lines), len(lines))

    # -- organizeOutputBy=Patient ---------------------------------------------------------

    async def _run_blocks(self) -> None:
        """Blocks of the resources in each Patient's compartment, in Patient id order,
        checkpointed like any item (the continuation is the last (patient, seq) read)."""
        record, request = self.record, self.record.request
        scope = await export_query(self.resources, request, record.snapshot_seq, "Patient")
        query = BlockQuery(
            snapshot_seq=record.snapshot_seq,
            types=[t for t in request.types if t in PATIENT_COMPARTMENT],
            since=request.since,
            until=request.until,
            patients=scope.patients,
        )
        blocks = BlockWriter(self, query, record.after_patient or None)
        while not record.done:
            if await self._stop_requested():
                return
            after = (record.after_patient, record.after_seq)
            rows, last = await self.resources.blocks(query, after, self.settings.page_size)
            record.resources_done += await blocks.append(rows)
            if rows:
                record.after_patient, record.after_seq = rows[-1].patient, rows[-1].seq
            record.done = last
            await self._page_done()
        if await self._stop_requested():
            return
        await self._checkpoint()
        await self._complete()


def block_header(patient: str) -> bytes:
    """The ``Parameters`` resource that starts a Patient's block (and each file it
    continues in)."""
    reference = {"reference": f"Patient/{patient}"}
    return orjson.dumps(
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "header", "valueReference": reference}],
        }
    )


class BlockWriter:
    """Writes (patient, resource) rows as blocks: a header, the block's Patient (where
    the export selects it), then the other resources of its compartment.

    Files roll between blocks once past ``max_file_bytes``; a block is split only when
    its file would pass twice that: the next file starts with the header again and the
    previous one records ``continues_in`` (the manifest's ``continuesInFile``)."""

    def __init__(self, task: ExportItemTask, query: BlockQuery, block: str | None) -> None:
        self.task = task
        self.query = query
        self.block = block
        """The Patient whose block the current file ends with (on resume: the last read)."""
        self.chunk: list[bytes] = []
        self.pending = 0
        self.current = task.record.output[-1] if task.record.output else None

    def _used(self) -> int:
        return (self.task._sizes[self.current.name] if self.current else 0) + self.pending

    async def _flush(self) -> None:
        if self.current is not None and self.chunk:
            await self.task._flush(self.current, self.chunk)
        self.chunk, self.pending = [], 0

    async def _roll(self) -> None:
        await self._flush()
        previous = self.current
        self.current = self.task._new_file("Patient")
        await self.task.dest.start_file(self.current)
        if previous is not None and self.block is not None:
            previous.continues_in = self.current.name  # set only mid-block, see append

    def _put(self, line: bytes) -> None:
        self.chunk.append(line)
        self.pending += len(line) + 1

    async def _patient(self, patient: str) -> bytes | None:
        """The block's Patient as stored, if the export selects it."""
        if self.query.types and "Patient" not in self.query.types:
            return None
        query = ExportQuery(
            "Patient",
            self.query.snapshot_seq,
            since=self.query.since,
            until=self.query.until,
            compartment=True,
            patients=[patient],
            ids=[patient],
        )
        page = await self.task.resources.page(query, 0, 1)
        return page.raws[0] if page.raws else None

    async def append(self, rows: Sequence[BlockRow]) -> int:
        """Write ``rows``; returns how many resources (not headers) were written."""
        limit = self.task.settings.max_file_bytes
        written = 0
        for row in rows:
            if row.patient != self.block:
                if self.current is None or self._used() >= limit:
                    self.block = None  # a new file at a block boundary continues nothing
                    await self._roll()
                self.block = row.patient
                self._put(block_header(row.patient))
                patient = await self._patient(row.patient)
                if patient is not None:
                    self._put(patient)
                    written += 1
            if row.type == "Patient" and row.id == row.patient:
                continue  # written first in its block
            if self._used() + len(row.raw) + 1 > 2 * limit:
                await self._roll()
                self._put(block_header(row.patient))
            self._put(row.raw)
            written += 1
        await self._flush()
        return written


async def _drop(future: asyncio.Future[Page]) -> None:
    """Cancel a page read ahead and wait for it, whatever it ended with."""
    future.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await future
