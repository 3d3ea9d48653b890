"""ImportBatchTask: loads the lines of one import batch from its checkpointed offset.

Each block of lines is one checkpoint: refused lines go to the batch's error file
(OperationOutcome ndjson naming input, line, byte offset and reason) through the
destination commit protocol; then the valid resources and the new offset, counts and
error-file state are written in ONE database transaction (``ResourceStore.write_versions``
with a checkpoint), fenced by the lease. On SQLite that transaction may hold the blocks of
other batches too (``WriteGroup``): a block is committed whole with its checkpoint, its
``job.checkpoint`` line is logged once it is, and a batch commits its last checkpoint
before it lets the job go. A resume re-reads from the recorded offset: error
lines committed after it vanish on restore and are written once more; resources are
upserted idempotently, so nothing is duplicated and nothing is lost.

Why it is shaped so (a bulk load is one large transaction after another, and every
per-line Python step counts): a block is up to ``EXPORTSVC_IMPORT_COMMIT_BYTES`` of whole
lines and at most ``EXPORTSVC_IMPORT_LINES_PER_COMMIT`` lines, cut from the input with a
few ``find`` calls per chunk; one call in a process of its own (:mod:`exportsvc.preparer`)
checks and stamps all its lines (``prepare_block``: each line parsed once, kept only as
its stamped bytes) while this process writes the block before, so the event loop stays
free, the writing thread keeps the GIL, and memory holds bytes, not parsed objects. All
versions of a block carry one pending stamp, which the store replaces by the time of its
transaction; it turns a stamped version into the next version of an existing resource
(or no new version) inside the transaction.
Cancel, pause and drain are seen between chunks: the lines read so far are handed over
as a shorter block, then the task stops at the block boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

from datastore.resources import Origin, WriteGroup, WriteResult
from datastore.versioning import NewVersion, Stamp
from exportsvc.errors import ExportSvcError, PreparingFailed
from exportsvc.ndjson_input import Prepared, owned_blocks, prepare_block
from exportsvc.preparer import PREPARER, PreparerFailed
from exportsvc.records import ImportBatchRecord, JobRecord
from exportsvc.sources import SourceReader
from exportsvc.tasks import JobTask, outcome_line, shielded

POSITION_BITS = 40  # an input offset below 1 TiB; the input index above it


class InputChanged(ExportSvcError):
    """The input changed since the import was kicked off."""

    status = 409


class ImportBatchTask(JobTask[ImportBatchRecord]):
    _pending: list[NewVersion]
    _positions: list[int]
    _writing: asyncio.Future[None] | None = None
    """The previous block's transaction, while the next block is read and prepared."""
    _stamp: Stamp | None = None
    """The pending stamp this run's versions carry until their write (``Stamp.pending``)."""

    @property
    def container(self) -> str | None:
        return None

    @property
    def sources(self) -> SourceReader:
        return SourceReader(self.settings, self.destinations)

    def _progress(self) -> dict[str, Any]:
        r = self.record
        return {"offset": r.offset, "lines": r.lines_read, "errors": r.errors}

    async def _run(self) -> None:
        record = self.record
        self._pending, self._positions = [], []
        PREPARER.start()  # its start-up overlaps the input's check and first read
        sources = self.sources
        try:
            info = await sources.stat(record.input.url)
            if (info.size, info.etag) != (record.input.size, record.input.etag):
                raise InputChanged(
                    f"input {record.input.url.split('?')[0]!r} changed since the kick-off"
                )
            await self._load(sources)
        finally:
            await sources.close()

    def _stopping(self) -> bool:
        signals = self.signals
        return any(e.is_set() for e in (signals.cancel, signals.pause, signals.drain, signals.lost))

    async def _load(self, sources: SourceReader) -> None:
        record, settings = self.record, self.settings
        chunks = sources.read_from(record.input.url, _read_from(record))
        blocks = owned_blocks(
            chunks,
            start=record.start,
            end=record.end,
            offset=record.offset,
            max_bytes=settings.import_max_line_bytes,
            block_bytes=settings.import_commit_bytes,
            block_lines=settings.import_lines_per_commit,
            flush=self._stopping,
        )
        base = record.input_index << POSITION_BITS
        # Lines are stamped when prepared with a stand-in the store replaces by the time
        # of the transaction that writes them (see ResourceStore.snapshot).
        stamp = self._stamp = Stamp.pending()
        try:
            async for block in blocks:
                if await self._stop_requested():
                    return
                calls: list[Callable[[], Prepared]] = [  # handed over: let go of once sent
                    partial(
                        prepare_block,
                        block,
                        record.input.type,
                        settings.import_max_line_bytes,
                        stamp,
                        base,
                        settings.import_max_depth,
                        self.resources.hashes_content,
                        self.resources.hashes_keys,
                    )
                ]
                end = block.end
                del block  # the call alone holds its bytes: freed while the child prepares
                prepared = await _prepare(calls)
                await self._settle()  # the record is the previous checkpoint's until now
                await self._report(prepared, sources)
                record.offset = end
                record.lines_read += prepared.lines
                for type_, count in prepared.counts.items():
                    record.counts[type_] = record.counts.get(type_, 0) + count
                self._pending, self._positions = prepared.versions, prepared.positions
                await self._checkpoint_soon()
            if await self._stop_requested():
                return
            record.offset = record.end if record.offset < record.end else record.offset
            await self._checkpoint()
        except BaseException:
            await self._abandon()
            raise
        finally:
            await blocks.aclose()  # the input is closed now, whatever stopped the loop
            await chunks.aclose()
        await self._complete()

    async def _abandon(self) -> None:
        """Failing: the write under way ends, and what this run wrote is committed or known
        lost, before the worker reads the record to count the failure against it."""
        writing, self._writing = self._writing, None
        with contextlib.suppress(Exception):
            if writing is not None:
                await asyncio.shield(writing)
        with contextlib.suppress(Exception):  # lost: the record is the last committed one
            await asyncio.shield(self.resources.commit_grouped(self._owner))

    async def _stop_requested(self) -> bool:
        if self._stopping():
            await self._settle()  # a stop saves the record: never before the write does
        return await super()._stop_requested()

    @property
    def _owner(self) -> tuple[str, int]:
        """Whose grouped writes these are: this run's, told apart from any other run's."""
        return self.record.id, self.record.lease.version

    async def _checkpoint(self) -> None:
        """The last checkpoint of a run (it ends, pauses or drains): written, and then
        committed with every block before it, before anything is built on it."""
        await self._settle()
        await super()._checkpoint()
        await shielded(self.resources.commit_grouped(self._owner))

    async def _checkpoint_soon(self) -> None:
        """Commit the files, start writing the block with its checkpoint, and go on: the
        next block is prepared while the database writes this one. ``_settle`` waits."""
        await self._commit_files()
        self._writing = asyncio.ensure_future(self._persist())

    async def _settle(self) -> None:
        """Wait for the block under way to be written (not committed: see ``_persist``)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            await asyncio.shield(writing)

    async def _report(self, prepared: Prepared, sources: SourceReader) -> None:
        """Write a block's refused lines to the batch's error file (committed with it)."""
        record = self.record
        for index, offset, reason in prepared.refused:
            errors = next((f for f in record.output if f.role == "error"), None)
            if errors is None:
                errors = self._new_file("OperationOutcome", role="error")
                await self.dest.start_file(errors)
            number = await self._line_number(sources) + index
            await self._write(errors, _error_line(record.input.url, number, offset, reason), 1)
            record.errors += 1

    async def _line_number(self, sources: SourceReader) -> int:
        """The input line number of the block's first line (read only for error reports)."""
        record = self.record
        if record.first_line is None:
            record.first_line = await _first_line(sources, record.input.url, record.start)
        return record.first_line + record.lines_read

    async def _persist(self) -> None:
        """The block's resources and the checkpoint in one transaction. On SQLite it may
        be shared with the blocks written after it, of this batch and others (a commit
        per block costs a third more): the checkpoint is logged once it has committed."""
        versions, positions = self._pending, self._positions
        self._pending, self._positions = [], []
        origin = Origin(self.record.parent_id or self.record.id, positions)
        committed = partial(self._checkpointed, self._checkpoint_fields())

        def checkpoint(result: WriteResult) -> JobRecord:
            record = self.record
            record.created += result.created
            record.updated += result.updated
            record.unchanged += result.unchanged
            return record

        await self.resources.write_versions(
            versions,
            origin=origin,
            checkpoint=checkpoint,
            restamp=self._stamp,
            group=WriteGroup(self._owner, committed),
        )


async def _prepare(prepare: list[Callable[[], Prepared]]) -> Prepared:
    """A block checked and stamped in the preparing process (:mod:`exportsvc.preparer`):
    parsing on a thread here would take the GIL from the thread writing the previous
    block (a 1M import ran at 0.70-0.75 of loop (c) so, 0.8 in a process of its own)."""
    try:
        return await asyncio.to_thread(PREPARER.hand_over, prepare)
    except PreparerFailed as exc:  # killed (out of memory?): the retry starts another
        raise PreparingFailed(str(exc)) from exc


def _error_line(url: str, number: int, offset: int, reason: str) -> bytes:
    return outcome_line(
        f"input {url.split('?', 1)[0]} line {number} (byte offset {offset}): {reason}",
        code="invalid",
        severity="error",
    )


def _read_from(record: ImportBatchRecord) -> int:
    return record.start - 1 if record.offset == record.start and record.start > 0 else record.offset


async def _first_line(sources: SourceReader, url: str, start: int) -> int:
    """The input line number of the first line a batch starting at ``start`` owns (read
    only for an error report): one past the newlines before it, one more when the line
    under ``start`` began earlier and so belongs to the batch before."""
    if start == 0:
        return 1
    count = seen = 0
    last = b""
    async for chunk in sources.read_from(url, 0):
        part = chunk[: start - seen]
        count += part.count(b"\n")
        seen += len(part)
        last = part[-1:] or last
        if seen >= start:
            break
    return count + (1 if last == b"\n" else 2)
