"""The DataValidator: proves a finished export equals the store as of its transactionTime.

It does not reuse the export's query path. It scans every stored version, works out in
Python which version of each resource was current at the job's snapshot and whether the
request selects it (``_typeFilter`` through :mod:`exportsvc.filtercheck`, its own reading
of the filter), then reads every output file and checks: each line well-formed and of the
file's type, every (type, id, versionId) exactly once, byte-equal to the stored version
(with ``_elements``: equal as JSON to the stored version subsetted), nothing missing,
nothing extra, and for every file (output, deleted, error) the manifest's count equal to
its lines and its fileSize equal to its bytes.
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
from exportsvc.fhir.provenance import PROVENANCE_VALUES, RELEVANT, recency, targets
from exportsvc.filtercheck import expected_subset
from exportsvc.filtercheck import selected as passes
from exportsvc.ndjson_input import MAX_DEPTH, owned_lines, parse_resource
from exportsvc.records import (
    ExportJobRecord,
    ExportKind,
    ImportBatchRecord,
    ImportJobRecord,
    JobStatus,
    OutputFile,
)
from exportsvc.sources import SourceReader
from exportsvc.views import JobView

MAX_LISTED = 20


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _json_digest(resource: Any) -> bytes:
    """Of the JSON value, whatever the key order or spacing."""
    return _digest(orjson.dumps(resource, option=orjson.OPT_SORT_KEYS))


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


Key = tuple[str, str]


@dataclass
class _Expected:
    output: dict[Key, tuple[str, bytes]] = field(default_factory=dict)
    """(type, id) → (versionId, digest) of each version the request selects."""
    deleted: dict[Key, int] = field(default_factory=dict)
    """(type, id) → version of the deletion, for each resource ``deleted[]`` lists."""
    blocks: dict[Key, frozenset[str]] = field(default_factory=dict)
    """organizeOutputBy: (type, id) → the Patients whose blocks must hold it."""


async def _expected(record: ExportJobRecord, resources: ResourceStore) -> _Expected:
    """What the request selects at the snapshot, decided in Python from every version."""
    request = record.request
    filtered = {q.type for q in request.type_filters}
    since, until = to_micros(request.since, MIN_TIME), to_micros(request.until, MAX_TIME)
    wanted = set(request.types)
    compartment = request.kind != ExportKind.SYSTEM or request.organize_by is not None
    provenance_mode = bool(PROVENANCE_VALUES & set(request.associated))
    current: dict[Key, tuple[str, bytes, frozenset[str]] | None] = {}
    # The last live version's compartment, and the deletions current at the snapshot.
    live: dict[Key, frozenset[str]] = {}
    deletions: dict[Key, tuple[int, frozenset[str]]] = {}
    provenances: dict[str, bytes] = {}
    groups: dict[str, bytes | None] = {}
    async for row in resources.scan_versions():
        if row.seq > record.snapshot_seq:
            break
        key = (row.type, row.id)
        if row.type == "Group":
            groups[row.id] = row.raw
        if row.type == "Provenance" and provenance_mode:
            if row.raw is None:
                provenances.pop(row.id, None)
            else:
                provenances[row.id] = row.raw
        in_scope = (
            (not wanted or row.type in wanted)
            and (not compartment or row.type in PATIENT_COMPARTMENT)
            and not (provenance_mode and row.type == "Provenance")
        )
        if not in_scope:
            continue
        deletions.pop(key, None)
        if row.raw is None:
            current[key] = None
            if since < row.last_updated <= until and request.since is not None:
                deletions[key] = (row.version, live.get(key, frozenset()))
            continue
        parsed: dict[str, Any] = {}
        if compartment or filtered or request.elements:
            parsed = orjson.loads(row.raw)
        patients = patient_ids(parsed) if compartment else frozenset()
        if compartment and request.since is not None:
            live[key] = patients
        if not since <= row.last_updated <= until:
            current[key] = None
            continue
        if row.type in filtered and not passes(parsed, request.type_filters):
            current[key] = None
            continue
        digest = (
            _json_digest(expected_subset(parsed, request.elements))
            if request.elements
            else _digest(row.raw)
        )
        current[key] = (str(row.version), digest, patients)
    members: frozenset[str] | None = None
    if request.kind == ExportKind.GROUP:
        group = groups.get(request.group_id or "")
        members = frozenset(member_ids(orjson.loads(group))) if group else frozenset()
    if request.patients:
        chosen = frozenset(request.patients)
        members = chosen if members is None else members & chosen

    def in_compartment(patients: frozenset[str]) -> bool:
        if not compartment:
            return True
        return bool(patients) and (members is None or not patients.isdisjoint(members))

    expected = _Expected()
    for key, value in current.items():
        if value is not None and in_compartment(value[2]):
            expected.output[key] = (value[0], value[1])
            if request.organize_by:
                expected.blocks[key] = value[2] if members is None else value[2] & members
    for key, (version, patients) in deletions.items():
        if in_compartment(patients):
            expected.deleted[key] = version
    if provenance_mode:
        exported = set(expected.output)
        for id_, raw in _associated(request.associated, provenances, exported).items():
            expected.output[("Provenance", id_)] = (_version_of(raw), _digest(raw))
    return expected


def _associated(
    values: list[str], provenances: dict[str, bytes], exported: set[Key]
) -> dict[str, bytes]:
    """The Provenance ``includeAssociatedData`` adds: every one with a target among the
    exported resources (Relevant), or only the most recent one of each such target
    (Latest). Relevant is the larger set, so it wins when both are asked for."""
    parsed = {id_: orjson.loads(raw) for id_, raw in provenances.items()}
    if RELEVANT in values:
        return {i: provenances[i] for i, p in parsed.items() if targets(p) & exported}
    latest: dict[Key, str] = {}
    for id_, resource in parsed.items():
        for key in targets(resource) & exported:
            best = latest.get(key)
            if best is None or recency(resource) > recency(parsed[best]):
                latest[key] = id_
    return {i: provenances[i] for i in set(latest.values())}


def _version_of(raw: bytes) -> str:
    return str(orjson.loads(raw)["meta"]["versionId"])


class _Size:
    """Counts the bytes of a file as it is read."""

    def __init__(self) -> None:
        self.bytes = 0

    async def of(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.bytes += len(chunk)
            yield chunk


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
    wanted = await _expected(record, resources)
    expected = wanted.output
    for type_, _id in expected:
        report.expected[type_] += 1
    for type_, _id in wanted.deleted:
        report.expected[f"{type_} (deleted)"] += 1
    seen: set[Key] = set()
    gone: set[Key] = set()
    subsetted = bool(record.request.elements)
    blocks = _Blocks(report, wanted, seen) if record.request.organize_by else None
    for f in view.files:
        size = _Size()
        lines = 0
        if blocks is not None and f.role == "output":
            blocks.start(f)
        async for line in _lines(size.of(dest.read(f.name))):
            lines += 1
            if blocks is not None and f.role == "output":
                blocks.line(f"{f.name} line {lines}", line)
            elif f.role == "output":
                _check_line(report, f.type, f.name, lines, line, expected, seen, subsetted)
            elif f.role == "deleted":
                _check_deletion(report, f"{f.name} line {lines}", line, wanted.deleted, gone)
        if lines != f.count:
            report.problem(f"{f.name}: the manifest counts {f.count} lines, the file has {lines}")
        if size.bytes != f.committed_bytes:
            report.problem(
                f"{f.name}: the manifest's fileSize is {f.committed_bytes}, "
                f"the file has {size.bytes} bytes"
            )
    if blocks is not None:
        blocks.finish()
    for type_, id_ in expected.keys() - seen:
        report.problem(f"missing: {type_}/{id_} (version {expected[(type_, id_)][0]})")
    for type_, id_ in wanted.deleted.keys() - gone:
        report.problem(f"missing from deleted[]: {type_}/{id_}")
    for type_, id_ in gone & seen:
        report.problem(f"{type_}/{id_} is both in output and in deleted[]")
    return report


class _Blocks:
    """Checks files of Patient blocks (organizeOutputBy): every file starts with a block
    header; a block's first header is followed by its Patient where the export selects
    it; each block appears once, split only across a file and the one its
    ``continues_in`` names; each selected resource is in the block of every Patient (in
    scope) whose compartment holds it, exactly once, byte-equal to the store."""

    def __init__(self, report: ValidationReport, wanted: _Expected, seen: set[Key]) -> None:
        self.report = report
        self.wanted = wanted
        self.seen = seen
        self.pairs: set[tuple[str, Key]] = set()
        self.ended: set[str] = set()
        self.block: str | None = None
        self.previous: OutputFile | None = None
        self.file: OutputFile | None = None
        self.first = False
        self.patient_next = False
        for key, patients in wanted.blocks.items():
            report.expected[key[0]] += len(patients) - 1  # one line per block

    def start(self, f: OutputFile) -> None:
        self.previous, self.file, self.first = self.file, f, True

    def line(self, where: str, line: bytes) -> None:
        report = self.report
        try:
            resource = orjson.loads(line)
        except orjson.JSONDecodeError:
            report.problem(f"{where}: not well-formed JSON")
            return
        if not isinstance(resource, dict):
            report.problem(f"{where}: not a JSON object")
            return
        if resource.get("resourceType") == "Parameters":
            self._header(where, resource)
            return
        if self.first or self.block is None:
            report.problem(f"{where}: a file of blocks must start with a header")
        type_, id_ = str(resource.get("resourceType")), str(resource.get("id"))
        if self.patient_next and (type_, id_) != ("Patient", self.block):
            report.problem(f"{where}: the block of Patient/{self.block} starts with {type_}/{id_}")
        self.patient_next = False
        key = (type_, id_)
        report.found[type_] += 1
        self.seen.add(key)
        want = self.wanted.output.get(key)
        if want is None or str(self.block) not in self.wanted.blocks.get(key, ()):
            report.problem(
                f"{where}: {type_}/{id_} does not belong in Patient/{self.block}'s block"
            )
        elif (self.block, key) in self.pairs:
            report.problem(f"{where}: {type_}/{id_} twice in Patient/{self.block}'s block")
        elif want[0] != str((resource.get("meta") or {}).get("versionId")):
            report.problem(f"{where}: {type_}/{id_} is not the version of the snapshot")
        elif want[1] != _digest(line):
            report.problem(f"{where}: {type_}/{id_} differs from the stored bytes")
        self.pairs.add((str(self.block), key))

    def _header(self, where: str, header: dict[str, Any]) -> None:
        try:
            patient = header["parameter"][0]["valueReference"]["reference"].split("/", 1)[1]
        except (KeyError, IndexError, TypeError, AttributeError):
            self.report.problem(f"{where}: a Parameters line that is no block header")
            return
        continued = self.first and self.previous is not None and self.previous.continues_in
        if (
            continued
            and self.file
            and self.previous
            and self.previous.continues_in != self.file.name
        ):
            self.report.problem(f"{where}: the previous file continues in another file")
        if continued and patient != self.block:
            self.report.problem(f"{where}: Patient/{self.block}'s block does not continue here")
        elif not continued and (patient in self.ended or patient == self.block):
            self.report.problem(f"{where}: a second block of Patient/{patient}")
        elif not continued:
            if self.block is not None:
                self.ended.add(self.block)
            self.block = patient
            selected = self.wanted.blocks.get(("Patient", patient), frozenset())
            self.patient_next = patient in selected
        self.first = False

    def finish(self) -> None:
        expected = {(p, k) for k, patients in self.wanted.blocks.items() for p in patients}
        for patient, (type_, id_) in sorted(expected - self.pairs)[:MAX_LISTED]:
            self.report.problem(f"missing: {type_}/{id_} in Patient/{patient}'s block")
        if self.file is not None and self.file.continues_in:
            self.report.problem(f"{self.file.name}: continues in a file the manifest lacks")


def _check_deletion(
    report: ValidationReport, where: str, line: bytes, deleted: dict[Key, int], gone: set[Key]
) -> None:
    """A deleted[] line: a transaction Bundle whose entries DELETE deleted resources."""
    try:
        bundle = orjson.loads(line)
    except orjson.JSONDecodeError:
        report.problem(f"{where}: not well-formed JSON")
        return
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        report.problem(f"{where}: not a Bundle")
        return
    if bundle.get("type") != "transaction" or not bundle.get("entry"):
        report.problem(f"{where}: not a transaction Bundle with entries")
        return
    for entry in bundle["entry"]:
        request = entry.get("request") or {} if isinstance(entry, dict) else {}
        type_, _, id_ = str(request.get("url")).partition("/")
        if request.get("method") != "DELETE" or not id_:
            report.problem(f"{where}: an entry that is not DELETE Type/id: {request}")
            continue
        report.found[f"{type_} (deleted)"] += 1
        if (type_, id_) in gone:
            report.problem(f"{where}: duplicate deletion of {type_}/{id_}")
        elif (type_, id_) not in deleted:
            report.problem(f"{where}: {type_}/{id_} was not deleted in the window")
        gone.add((type_, id_))


def _check_line(
    report: ValidationReport,
    file_type: str,
    name: str,
    number: int,
    line: bytes,
    expected: dict[Key, tuple[str, bytes]],
    seen: set[Key],
    subsetted: bool,
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
    elif want[1] != (_json_digest(resource) if subsetted else _digest(line)):
        stored = "the stored resource subsetted" if subsetted else "the stored bytes"
        report.problem(f"{where}: {type_}/{id_} differs from {stored}")


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
