"""The DataValidator: proves a finished export equals the store as of its transactionTime.

It does not reuse the export's query path. It scans every stored version, works out in
Python which version of each resource was current at the job's snapshot and whether the
request selects it, then reads every output file and checks: each line well-formed and
of the file's type, every (type, id, versionId) exactly once, byte-equal to the stored
version, nothing missing, nothing extra, and each manifest count equal to the lines.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from datastore.resources import MAX_TIME, MIN_TIME, ResourceStore, to_micros
from datastore.versioning import content_without_meta
from destinations import ExportDestinationClient
from exportsvc.fhir.compartment import PATIENT_COMPARTMENT, patient_ids
from exportsvc.fhir.group import member_ids
from exportsvc.ndjson_input import MAX_DEPTH, owned_lines, parse_resource
from exportsvc.records import (
    ExportJobRecord,
    ExportKind,
    ImportBatchRecord,
    ImportJobRecord,
    JobStatus,
)
from exportsvc.sources import SourceReader
from exportsvc.views import JobView

MAX_LISTED = 20


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


@dataclass
class ValidationReport:
    job_id: str
    expected: Counter[str] = field(default_factory=Counter)
    found: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(text)

    def render(self) -> str:
        lines = [f"DataValidator report for export {self.job_id}"]
        lines.append(f"{'type':<28}{'expected':>12}{'exported':>12}")
        for type_ in sorted(set(self.expected) | set(self.found)):
            mark = "" if self.expected[type_] == self.found[type_] else "  <-- differs"
            lines.append(f"{type_:<28}{self.expected[type_]:>12}{self.found[type_]:>12}{mark}")
        total_e, total_f = sum(self.expected.values()), sum(self.found.values())
        lines.append(f"{'total':<28}{total_e:>12}{total_f:>12}")
        if self.ok:
            lines.append("OK: the export equals the store as of its transactionTime")
        else:
            lines.append(f"FAILED: {self.problem_count} problem(s)")
            lines += [f"  - {p}" for p in self.problems]
            if self.problem_count > len(self.problems):
                lines.append(f"  ... and {self.problem_count - len(self.problems)} more")
        return "\n".join(lines)


async def _expected(
    record: ExportJobRecord, resources: ResourceStore
) -> dict[tuple[str, str], tuple[str, bytes]]:
    """(type, id) → (versionId, digest) of each version the request selects at the snapshot."""
    request = record.request
    since, until = to_micros(request.since, MIN_TIME), to_micros(request.until, MAX_TIME)
    wanted = set(request.types)
    compartment = request.kind != ExportKind.SYSTEM
    current: dict[tuple[str, str], tuple[str, bytes, frozenset[str]] | None] = {}
    groups: dict[str, bytes | None] = {}
    async for row in resources.scan_versions():
        if row.seq > record.snapshot_seq:
            break
        if row.type == "Group":
            groups[row.id] = row.raw
        selected = (
            row.raw is not None
            and (not wanted or row.type in wanted)
            and (not compartment or row.type in PATIENT_COMPARTMENT)
            and since <= row.last_updated <= until
        )
        if not selected or row.raw is None:
            current[(row.type, row.id)] = None
            continue
        patients = patient_ids(orjson.loads(row.raw)) if compartment else frozenset()
        current[(row.type, row.id)] = (str(row.version), _digest(row.raw), patients)
    members: frozenset[str] | None = None
    if request.kind == ExportKind.GROUP:
        group = groups.get(request.group_id or "")
        members = frozenset(member_ids(orjson.loads(group))) if group else frozenset()
    if request.patients:
        chosen = frozenset(request.patients)
        members = chosen if members is None else members & chosen
    expected = {}
    for key, value in current.items():
        if value is None:
            continue
        if compartment and (not value[2] or (members is not None and value[2].isdisjoint(members))):
            continue
        expected[key] = (value[0], value[1])
    return expected


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    carry = b""
    async for chunk in chunks:
        parts = (carry + chunk).split(b"\n")
        carry = parts.pop()
        for part in parts:
            yield part
    if carry:
        yield carry + b"<no final newline>"


async def validate_export(
    view: JobView, resources: ResourceStore, dest: ExportDestinationClient
) -> ValidationReport:
    record = view.job
    assert isinstance(record, ExportJobRecord)
    report = ValidationReport(record.id)
    if record.status != JobStatus.COMPLETED:
        report.problem(f"the job is {record.status.value}, not completed")
        return report
    expected = await _expected(record, resources)
    for type_, _id in expected:
        report.expected[type_] += 1
    seen: set[tuple[str, str]] = set()
    for f in view.files:
        if f.role != "output":
            continue
        lines = 0
        async for line in _lines(dest.read(f.name)):
            lines += 1
            _check_line(report, f.type, f.name, lines, line, expected, seen)
        if lines != f.count:
            report.problem(f"{f.name}: the manifest counts {f.count} lines, the file has {lines}")
    for type_, id_ in expected.keys() - seen:
        report.problem(f"missing: {type_}/{id_} (version {expected[(type_, id_)][0]})")
    return report


def _check_line(
    report: ValidationReport,
    file_type: str,
    name: str,
    number: int,
    line: bytes,
    expected: dict[tuple[str, str], tuple[str, bytes]],
    seen: set[tuple[str, str]],
) -> None:
    where = f"{name} line {number}"
    try:
        resource = orjson.loads(line)
    except orjson.JSONDecodeError:
        report.problem(f"{where}: not well-formed JSON")
        return
    if not isinstance(resource, dict):
        report.problem(f"{where}: not a JSON object")
        return
    type_, id_ = resource.get("resourceType"), resource.get("id")
    version = (resource.get("meta") or {}).get("versionId")
    if type_ != file_type:
        report.problem(f"{where}: a {type_} in a {file_type} file")
    key = (str(type_), str(id_))
    report.found[key[0]] += 1
    if key in seen:
        report.problem(f"{where}: duplicate {type_}/{id_}")
        return
    seen.add(key)
    want = expected.get(key)
    if want is None:
        report.problem(f"{where}: extra {type_}/{id_} (not selected at the snapshot)")
    elif want[0] != version:
        report.problem(f"{where}: {type_}/{id_} version {version}, expected {want[0]}")
    elif want[1] != _digest(line):
        report.problem(f"{where}: {type_}/{id_} differs from the stored bytes")


# -- imports -------------------------------------------------------------------------------


async def validate_import(
    parent: ImportJobRecord,
    batches: list[ImportBatchRecord],
    resources: ResourceStore,
    sources: SourceReader,
    read_file: Callable[[ImportBatchRecord, str], AsyncIterator[bytes]],
    *,
    max_line_bytes: int,
    max_depth: int = MAX_DEPTH,
) -> ValidationReport:
    """Re-read every input: each valid line's resource (the last line of an id wins) must
    be the store's current version, apart from meta; each refused line must be reported
    exactly once in the error files, and nothing else.

    It compares with the store as it is now, so run it before anything else writes the
    same resources."""
    report = ValidationReport(parent.id)
    if parent.status != JobStatus.COMPLETED:
        report.problem(f"the import is {parent.status.value}, not completed")
        return report
    expected: dict[tuple[str, str], dict[str, Any]] = {}
    refused: set[tuple[str, int]] = set()
    for item in parent.request.inputs:
        url = item.url.split("?", 1)[0]
        lines = owned_lines(
            sources.read_from(item.url, 0),
            start=0,
            end=item.size,
            offset=0,
            max_bytes=max_line_bytes,
        )
        number = 0
        async for line in lines:
            number += 1
            if line.data is not None and not line.data.strip():
                continue
            parsed = (
                parse_resource(line.data, item.type, max_depth=max_depth)
                if line.data is not None
                else "long"
            )
            if isinstance(parsed, str):
                refused.add((url, number))
            else:
                expected[(parsed["resourceType"], parsed["id"])] = content_without_meta(parsed)
    for type_, _id in expected:
        report.expected[type_] += 1
    for (type_, id_), content in expected.items():
        stored = await resources.read(type_, id_)
        if stored is None:
            report.problem(f"missing: {type_}/{id_}")
            continue
        report.found[type_] += 1
        if content_without_meta(stored) != content:
            report.problem(f"{type_}/{id_}: the store holds other content than the input")
    reported: Counter[tuple[str, int]] = Counter()
    for batch in batches:
        for f in batch.output:
            if f.role != "error":
                continue
            async for error in _lines(read_file(batch, f.name)):
                text = str(orjson.loads(error)["issue"][0]["diagnostics"])
                match = _ERROR.match(text)
                if match is None:
                    report.problem(f"an error line that names no input line: {text[:120]}")
                    continue
                reported[(match["url"], int(match["line"]))] += 1
    for key, count in reported.items():
        if count > 1:
            report.problem(f"input {key[0]} line {key[1]} reported {count} times")
        if key not in refused:
            report.problem(f"input {key[0]} line {key[1]} reported but valid")
    for key in refused - set(reported):
        report.problem(f"input {key[0]} line {key[1]} refused but not reported")
    report.expected["(refused lines)"] = len(refused)
    report.found["(refused lines)"] = sum(reported.values())
    return report


_ERROR = re.compile(r"^input (?P<url>\S+) line (?P<line>\d+) \(byte offset \d+\): ")
