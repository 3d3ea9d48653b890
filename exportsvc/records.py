"""Job records: the single source of truth for every job (DESIGN.md section 3).

A record is stored as JSON beside a few indexed columns. Fields that other parties change
while a worker holds the job (``status`` at acquisition, the lease, ``restart_count``,
``cancel_requested``, ``pause_requested``) live in those columns, and the store overlays
them on the JSON when it loads a record, so a worker's checkpoint never overwrites a
cancel request made meanwhile.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, Field, TypeAdapter

from exportsvc.search.model import TypeFilter


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRIABLE = "retriable"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = frozenset(
    {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.RETRIABLE, JobStatus.PAUSED}
)


class ExportKind(StrEnum):
    SYSTEM = "system"
    PATIENT = "patient"
    GROUP = "group"


class ExportRequest(BaseModel):
    """What the client asked for, normalised (parsing lives in ``exportsvc.params``)."""

    kind: ExportKind
    group_id: str | None = None
    types: list[str] = Field(default_factory=list)
    """Requested ``_type`` values; empty means every type the store holds."""
    since: datetime | None = None
    until: datetime | None = None
    patients: list[str] = Field(default_factory=list)
    output_format: str = "application/fhir+ndjson"
    container: str | None = None
    """``_container``: where the files go (Azure container; filesystem sub-folder)."""
    request_url: str
    """The kick-off URL as the client sent it: the manifest's ``request``."""
    ignored: list[str] = Field(default_factory=list)
    """Problems ignored under ``Prefer: handling=lenient``; reported in the error file."""
    type_filters: list[TypeFilter] = Field(default_factory=list)
    """``_typeFilter`` queries (``exportsvc.search``): OR'd per type."""
    elements: list[str] = Field(default_factory=list)
    """``_elements``: ``Type.element`` or ``element`` entries (``exportsvc.search.elements``)."""
    associated: list[str] = Field(default_factory=list)
    """``includeAssociatedData`` values (``LatestProvenanceResources``,
    ``RelevantProvenanceResources``)."""
    organize_by: str | None = None
    """``organizeOutputBy`` (``Patient``): files of patient blocks instead of one type."""
    partial_manifests: bool = False
    """``allowPartialManifests``: manifest pages, each available once its files are."""
    separate_status: bool = False
    """``Prefer: separate-export-status``: status polls answer 200 + ``X-Export-Status``."""

    def fingerprint(self) -> str:
        """Identity of the request for de-duplication: everything but the URL spelling."""
        body = self.model_dump(mode="json", exclude={"request_url", "ignored"})
        body["types"] = sorted(body["types"])
        body["patients"] = sorted(body["patients"])
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


class Lease(BaseModel):
    owner: str | None = None
    version: int = 0
    """Fencing token: bumped on every acquisition; every worker write names it."""
    expires_at: datetime | None = None


FileRole = Literal["output", "error", "deleted"]


class OutputFile(BaseModel):
    """One output file and its committed state at the last checkpoint."""

    type: str
    sequence: int
    name: str
    role: FileRole = "output"
    count: int = 0
    committed_bytes: int = 0
    committed_blocks: list[str] = Field(default_factory=list)
    etag: str | None = None
    continues_in: str | None = None
    """``organizeOutputBy``: the file the last block of this one continues in."""


class JobRecord(BaseModel):
    """What every job and work item has: identity, status, lease, failures, files."""

    id: str
    kind: str
    client: str
    fingerprint: str = ""
    parent_id: str | None = None
    """Set on work items (import batches): the job they belong to."""
    secret_name: str | None = None

    status: JobStatus = JobStatus.QUEUED
    lease: Lease = Field(default_factory=Lease)
    failure_count: int = 0
    restart_count: int = 0
    retry_after: datetime | None = None
    last_error: str | None = None
    error_status: int | None = None
    cancel_requested: bool = False
    pause_requested: bool = False
    output: list[OutputFile] = Field(default_factory=list)

    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    completed_at: datetime | None = None

    @property
    def visible(self) -> bool:
        """A cancelled (or cancel-requested) job no longer exists for its client."""
        return not self.cancel_requested and self.status != JobStatus.CANCELLED


class ExportJobRecord(JobRecord):
    """An export. A worker first plans it: splits it into work items (one per resource
    type, and sequence ranges of large types) that any worker may run; the export's
    status then follows its items. Its own output is the error file of ignored input."""

    kind: Literal["export"] = "export"
    request: ExportRequest
    transaction_time: datetime
    snapshot_seq: int
    """The store sequence at kick-off: the export is the store as of this point."""
    planned: bool = False
    item_count: int = 0
    total_estimate: int | None = None


class ExportItemRecord(JobRecord):
    """The resources of one type with ``seq_after < seq <= seq_max``, and where it stands."""

    kind: Literal["export-item"] = "export-item"
    request: ExportRequest
    transaction_time: datetime
    snapshot_seq: int
    type: str
    scope: str
    """File names of the item start with ``{scope}-``: the type, or type.part."""
    seq_after: int
    seq_max: int
    after_seq: int
    """The continuation point: the last sequence read."""
    content: Literal["resources", "deleted", "provenance", "organized"] = "resources"
    """What the item writes: resources of ``type``; transaction Bundles of its deletions
    (``deleted[]``); the Provenance associated with the export's other resources; or
    (``organizeOutputBy=Patient``) blocks of every selected type by Patient."""
    after_patient: str = ""
    """Organized items: the Patient of the last row read (continuation with ``after_seq``)."""
    done: bool = False
    total_estimate: int = 0
    resources_done: int = 0
    pages_read: int = 0


class ImportMode(StrEnum):
    INCREMENTAL = "IncrementalLoad"
    INITIAL = "InitialLoad"


class ImportInput(BaseModel):
    type: str | None = None
    url: str
    etag: str | None = None
    size: int = 0


class ImportRequest(BaseModel):
    mode: ImportMode = ImportMode.INCREMENTAL
    inputs: list[ImportInput]
    request_url: str

    def fingerprint(self) -> str:
        body = self.model_dump(mode="json", exclude={"request_url"})
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


class ImportJobRecord(JobRecord):
    """The parent of an import: never leased; its batches are the work items."""

    kind: Literal["import"] = "import"
    request: ImportRequest
    transaction_time: datetime
    batch_count: int


class ImportBatchRecord(JobRecord):
    """Lines of one input whose first byte lies in ``[start, end)``, and where it stands."""

    kind: Literal["import-batch"] = "import-batch"
    input_index: int
    input: ImportInput
    mode: ImportMode = ImportMode.INCREMENTAL
    start: int
    end: int
    offset: int
    """The byte offset of the next line to read: the continuation point."""
    lines_read: int = 0
    first_line: int | None = None
    """The input's line number (1-based) of the batch's first line, counted when needed."""
    counts: dict[str, int] = Field(default_factory=dict)
    """Resources imported per type (created or updated; unchanged ones included)."""
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: int = 0


Job = ExportJobRecord | ExportItemRecord | ImportJobRecord | ImportBatchRecord
JOB_ADAPTER: TypeAdapter[Job] = TypeAdapter(Annotated[Job, Field(discriminator="kind")])


def load_record(data: str | bytes) -> Job:
    return JOB_ADAPTER.validate_json(data)
