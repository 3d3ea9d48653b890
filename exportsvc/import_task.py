"""ImportBatchTask: loads the lines of one import batch from its checkpointed offset.

Each group of lines is one checkpoint: refused lines go to the batch's error file
(OperationOutcome ndjson naming input, line, byte offset and reason) through the
destination commit protocol; then the valid resources and the new offset, counts and
error-file state are written in ONE database transaction (``ResourceStore.write`` with a
checkpoint), fenced by the lease. A resume re-reads from the recorded offset: error lines
committed after it vanish on restore and are written once more; resources are upserted
idempotently, so nothing is duplicated and nothing is lost.
"""

from __future__ import annotations

from typing import Any

from datastore.resources import Origin, WriteResult
from exportsvc.errors import ExportSvcError
from exportsvc.ndjson_input import Line, owned_lines, parse_resource
from exportsvc.records import ImportBatchRecord, JobRecord
from exportsvc.sources import SourceReader
from exportsvc.tasks import JobTask, outcome_line

POSITION_BITS = 40  # an input offset below 1 TiB; the input index above it


class InputChanged(ExportSvcError):
    """The input changed since the import was kicked off."""

    status = 409


class ImportBatchTask(JobTask[ImportBatchRecord]):
    _pending: list[dict[str, Any]]
    _positions: list[int]

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

    async def _load(self, sources: SourceReader) -> None:
        record = self.record
        lines = owned_lines(
            sources.read_from(record.input.url, _read_from(record)),
            start=record.start,
            end=record.end,
            offset=record.offset,
            max_bytes=self.settings.import_max_line_bytes,
        )
        group = 0
        async for line in lines:
            if await self._stop_requested():
                return
            refused = self._take(line)
            if refused is not None:
                errors = next((f for f in record.output if f.role == "error"), None)
                if errors is None:
                    errors = self._new_file("OperationOutcome", role="error")
                    await self.dest.start_file(errors)
                await self._write(errors, await self._error_line(line, refused, sources), 1)
                record.errors += 1
            record.offset = line.end
            record.lines_read += 1
            group += 1
            if group >= self.settings.import_lines_per_commit:
                await self._checkpoint()
                group = 0
        record.offset = record.end if record.offset < record.end else record.offset
        await self._checkpoint()
        await self._complete()

    def _take(self, line: Line) -> str | None:
        """Queue the line's resource for the next checkpoint, or say why it is refused."""
        if line.data is None:
            return f"the line is longer than {self.settings.import_max_line_bytes} bytes"
        if not line.data.strip():
            return None  # blank lines are allowed and skipped
        resource = parse_resource(
            line.data, self.record.input.type, max_depth=self.settings.import_max_depth
        )
        if isinstance(resource, str):
            return resource
        self._pending.append(resource)
        self._positions.append((self.record.input_index << POSITION_BITS) + line.offset)
        counts = self.record.counts
        counts[resource["resourceType"]] = counts.get(resource["resourceType"], 0) + 1
        return None

    async def _error_line(self, line: Line, reason: str, sources: SourceReader) -> bytes:
        record = self.record
        if record.first_line is None:
            record.first_line = await _first_line(sources, record.input.url, record.start)
        number = record.first_line + record.lines_read
        url = record.input.url.split("?", 1)[0]
        return outcome_line(
            f"input {url} line {number} (byte offset {line.offset}): {reason}",
            code="invalid",
            severity="error",
        )

    async def _persist(self) -> None:
        """The group's resources and the checkpoint in one transaction."""
        resources, positions = self._pending, self._positions
        self._pending, self._positions = [], []
        origin = Origin(self.record.parent_id or self.record.id, positions)

        def checkpoint(result: WriteResult) -> JobRecord:
            record = self.record
            record.created += result.created
            record.updated += result.updated
            record.unchanged += result.unchanged
            return record

        await self.resources.write(resources, origin=origin, checkpoint=checkpoint)


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
