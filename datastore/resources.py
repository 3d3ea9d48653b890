"""The resource store: versioned FHIR resources (DESIGN.md section 2).

Every write creates a new version with a store-wide increasing sequence number, and the
version it replaces remembers the sequence of its successor (``next_seq``). The latest
version of a resource as of snapshot ``S`` is therefore the one row with
``seq <= S < next_seq`` (``next_seq`` null meaning infinity): an export reads exactly the
store as of its kick-off, whatever is written while it runs. Pages are keyset pages over
``(type, seq)``, resumed from a continuation point, never OFFSET.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from datastore.versioning import NewVersion, Stamp

if TYPE_CHECKING:
    from exportsvc.records import JobRecord

MIN_TIME = -(2**62)
MAX_TIME = 2**62


def to_micros(instant: datetime | None, default: int) -> int:
    """An aware datetime as microseconds since the epoch (the store's time column)."""
    if instant is None:
        return default
    return int(instant.timestamp() * 1_000_000)


@dataclass(frozen=True, slots=True)
class ExportQuery:
    """Which resources of one type an export reads, as of ``snapshot_seq``."""

    type: str
    snapshot_seq: int
    since: datetime | None = None
    until: datetime | None = None
    compartment: bool = False
    """Only resources in some Patient's compartment (Patient and Group level)."""
    patients: Sequence[str] | None = None
    """With ``compartment``: only those in one of these Patients' compartments."""
    ids: Sequence[str] | None = None
    """Only resources with one of these ids (``_id`` of a ``_typeFilter``)."""
    last_seq: int | None = None
    """Only versions with ``seq <= last_seq``: a work item's share of the type."""

    @property
    def upper_seq(self) -> int:
        """The highest ``seq`` the query may return."""
        return self.snapshot_seq if self.last_seq is None else min(self.last_seq, self.snapshot_seq)


@dataclass(frozen=True, slots=True)
class BlockQuery:
    """Resources by Patient compartment, as of ``snapshot_seq`` (``organizeOutputBy``)."""

    snapshot_seq: int
    types: Sequence[str] = ()
    """Only these types; empty: every type."""
    since: datetime | None = None
    until: datetime | None = None
    patients: Sequence[str] | None = None
    """Only the compartments of these Patients; None: every Patient's."""


@dataclass(frozen=True, slots=True)
class BlockRow:
    """A resource in the compartment of ``patient``: one row per (patient, resource)."""

    patient: str
    seq: int
    type: str
    id: str
    version: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class Page:
    ndjson: bytes
    """The stored JSON of each matching resource in ``seq`` order, each on a line of its
    own that ends in a newline (stored JSON is compact: it holds no raw newline). This is
    what an export writes, as one object. SQLite joins it in SQL, so reading a page makes
    no Python object per resource and gives up the GIL once per page rather than once per
    row; PostgreSQL's rows are decoded by asyncpg in C and joined once (``Page.of``)."""
    count: int
    """How many resources (lines) ``ndjson`` holds."""
    next_after: int
    """The continuation point: the last ``seq`` read (or the input one if empty)."""
    last: bool

    @classmethod
    def of(cls, raws: Sequence[bytes], next_after: int, last: bool) -> Page:
        """A page of separate stored resources (a store that cannot join them itself)."""
        return cls(ndjson_lines(raws), len(raws), next_after, last)

    @property
    def raws(self) -> list[bytes]:
        """The stored JSON of each resource: for the pages an export must parse."""
        return self.ndjson.split(b"\n")[:-1]


def ndjson_lines(raws: Iterable[bytes]) -> bytes:
    """``raws`` as ndjson, each line ending in a newline: one join, one copy."""
    return b"\n".join(itertools.chain(raws, (b"",)))


@dataclass(frozen=True, slots=True)
class Deletion:
    """A resource whose version current at a snapshot is a deletion (that version)."""

    seq: int
    id: str
    version: int
    deleted_at: int
    """When it was deleted: microseconds since the epoch (the version's time column)."""


@dataclass(frozen=True, slots=True)
class DeletionPage:
    rows: list[Deletion]
    last: bool


@dataclass(frozen=True, slots=True)
class VersionRow:
    """One stored version, deleted ones included: what the DataValidator reads."""

    seq: int
    type: str
    id: str
    version: int
    next_seq: int | None
    last_updated: int
    deleted: bool
    raw: bytes | None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where written resources come from in an import: ``positions[i]`` orders
    ``resources[i]`` within the job's inputs. A version written from a later position of
    the same job is never replaced from an earlier one, so among duplicate ids in an
    input the last line wins, whatever order the batches run in."""

    job_id: str
    positions: Sequence[int]


@dataclass(slots=True)
class WriteResult:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    versions: list[tuple[str, str, int]] = field(default_factory=list)

    def add(self, other: WriteResult) -> None:
        """Count in a second write of the same transaction (its versions after these)."""
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.versions += other.versions


Checkpoint = Callable[[WriteResult], "JobRecord"]
"""Called inside a write's transaction with its result; returns the record to save."""


@dataclass(frozen=True, slots=True)
class WriteGroup:
    """A write that may be committed after the call returns, together with later writes
    (:meth:`ResourceStore.write_versions`), as an import batch writes its blocks."""

    owner: Hashable
    """Whose writes: an import batch's run (its job id and lease version)."""
    on_commit: Callable[[], None]
    """Called on the event loop once the write is committed; never if it is lost."""


class ResourceStore(abc.ABC):
    hashes_content: ClassVar[bool] = False
    """Whether :meth:`write_versions` compares contents by ``NewVersion.content_hash``:
    whoever prepares versions for it computes that hash from the parsed resource
    (``first_version(..., hashed=True)``), so the store need not parse them again."""
    hashes_keys: ClassVar[bool] = False
    """Whether :meth:`write_versions` finds resources by ``NewVersion.key_hash``: whoever
    prepares versions for it computes that too (``first_version(..., keyed=True)``)."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect and create the schema."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def current_seq(self) -> int:
        """The sequence of the newest committed version (0 for an empty store)."""

    @abc.abstractmethod
    async def write(
        self,
        resources: Iterable[Mapping[str, Any]],
        *,
        keep_last_updated: bool = False,
        origin: Origin | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> WriteResult:
        """Store each resource as a new version (one transaction).

        Sets ``meta.versionId`` and ``meta.lastUpdated`` (the latter kept as given when
        ``keep_last_updated``, as the seeder does to spread data over past years). A
        resource whose content equals its current version creates no new version.
        With ``checkpoint``, the record it returns is saved, fenced by its lease version,
        in the same transaction: a stale lease (``LeaseLost``) writes nothing.
        """

    async def write_versions(
        self,
        versions: Sequence[NewVersion],
        *,
        origin: Origin | None = None,
        checkpoint: Checkpoint | None = None,
        restamp: Stamp | None = None,
        group: WriteGroup | None = None,
    ) -> WriteResult:
        """Store versions prepared elsewhere as first versions (``first_version``, or
        ``new_version`` with no previous one: a seeding process, an import's lines); any
        whose resource already exists, or comes twice, goes through :meth:`write`'s rules
        (identical content: no new version; ``origin``: the last line wins), keeping its
        lastUpdated. ``origin`` and ``checkpoint`` as for :meth:`write`, in the same one
        transaction. ``restamp``: the versions carry this pending stamp
        (:meth:`Stamp.pending`), to be replaced by the time of the write transaction.
        ``group``: the write need not be committed before the call returns. A backend may
        commit it later with other grouped writes (SQLite: ``SqliteDatabase.run_grouped``),
        whole, and before any other call on the store, then call ``group.on_commit``. If
        that shared transaction fails, the next grouped write of the same owner, or its
        :meth:`commit_grouped`, raises ``WritesLost``. Backends may do this faster than
        this default, which commits before it returns."""
        result = await self.write(
            [orjson.loads(v.raw) for v in versions],
            keep_last_updated=restamp is None,
            origin=origin,
            checkpoint=checkpoint,
        )
        if group is not None:
            group.on_commit()
        return result

    async def commit_grouped(self, owner: Hashable) -> None:
        """Commit the grouped writes not yet committed (``write_versions(group=...)``);
        ``WritesLost`` when a transaction that held some of ``owner``'s was rolled back
        since its last grouped call. The default backend leaves none uncommitted."""
        return None

    async def snapshot(self) -> tuple[int, datetime]:
        """An export's snapshot: ``(seq, time)``, such that every version with a larger
        ``seq`` has a later lastUpdated than ``time``. Writes stamp their versions inside
        their transaction, so a backend with concurrent writers takes ``time`` first and
        then reads the sequence once no write is in progress (under its write lock)."""
        moment = datetime.now(UTC)
        return await self.current_seq(), moment

    @abc.abstractmethod
    async def delete(self, type_: str, id_: str) -> bool:
        """Record a deletion as a new version; False when there is nothing to delete."""

    @abc.abstractmethod
    async def read(self, type_: str, id_: str, as_of: int | None = None) -> dict[str, Any] | None:
        """The latest non-deleted version as of sequence ``as_of`` (default: now)."""

    @abc.abstractmethod
    async def seq_bounds(self, type_: str, as_of: int) -> tuple[int, int] | None:
        """The lowest and highest sequence of any version of ``type_`` up to ``as_of``
        (index look-ups: how a planner splits a large type into ranges)."""

    @abc.abstractmethod
    async def types(self, as_of: int) -> list[str]:
        """The resource types with at least one version at or before ``as_of``."""

    @abc.abstractmethod
    async def page(self, query: ExportQuery, after_seq: int, limit: int) -> Page:
        """Up to ``limit`` matching rows with ``seq > after_seq``, in ``seq`` order."""

    @abc.abstractmethod
    async def count(self, query: ExportQuery) -> int:
        """How many resources ``query`` matches (for progress)."""

    @abc.abstractmethod
    async def deletions(self, query: ExportQuery, after_seq: int, limit: int) -> DeletionPage:
        """Up to ``limit`` resources of ``query.type`` deleted as of the snapshot, in
        ``seq`` order from ``after_seq``: those whose version current at
        ``query.snapshot_seq`` is a deletion made in ``(since, until]`` (``since``
        exclusive: deleted *after* it). A resource deleted and re-created is current, not
        deleted. Compartment filters apply to the last live version, the one deleted."""

    @abc.abstractmethod
    async def count_deletions(self, query: ExportQuery) -> int:
        """How many resources :meth:`deletions` pages through."""

    @abc.abstractmethod
    async def blocks(
        self, query: BlockQuery, after: tuple[str, int], limit: int
    ) -> tuple[list[BlockRow], bool]:
        """Up to ``limit`` (patient, resource) pairs after ``after`` in (patient id,
        ``seq``) order: the resources current at the snapshot, selected by type and
        ``_since``/``_until``, in each Patient's compartment; and whether it is the last
        page. A resource in several compartments comes once for each."""

    @abc.abstractmethod
    def scan_versions(self, batch: int = 5000) -> AsyncIterator[VersionRow]:
        """Every stored version in ``seq`` order, deleted ones included."""
