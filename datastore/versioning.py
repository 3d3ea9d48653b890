"""Pure helpers shared by every resource store backend: versions, meta, time columns."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple

import orjson

from exportsvc.fhir.compartment import patient_ids


@lru_cache(maxsize=16)
def fhir_instant(moment: datetime) -> str:
    """A FHIR ``instant`` in UTC with milliseconds: ``2024-01-02T03:04:05.678Z``.

    Remembered: a write stamps all its versions with one ``now``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"instant without a time zone: {text!r}")
    return moment


def _right_sized(data: bytes) -> bytes:
    """A copy of ``data`` in a buffer of its own size. ``orjson.dumps`` hands back bytes in
    its whole work buffer (4 KiB and up with orjson 3.12+, never trimmed), so a batch of
    stored versions held in memory would take five times their size."""
    return bytes(memoryview(data))


def content_without_meta(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A resource apart from the meta the server assigns (versionId, lastUpdated)."""
    body = dict(resource)
    meta = dict(body.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if meta:
        body["meta"] = meta
    else:
        body.pop("meta", None)
    return body


def content_hash(content: Mapping[str, Any]) -> bytes:
    """The hash two versions share exactly when their contents (without the server's
    meta: ``content_without_meta``) are the same JSON: objects compared whatever their
    key order, every value as parsed, so ``1`` and ``1.0`` differ as their bytes do."""
    canonical = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).digest()


def key_hash(type_: str, id_: str) -> int:
    """A signed 64-bit hash of ``type/id``: the SQLite store's index key that finds a
    resource's rows (``datastore.sqlite``). Here, beside :func:`content_hash`, so that the
    process preparing an import's lines computes it (``first_version(..., keyed=True)``)
    instead of the thread that writes them."""
    digest = hashlib.blake2b(f"{type_}/{id_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class NewVersion(NamedTuple):
    """A version ready to insert. A tuple: cheap to build and to pickle (seeding sends
    them between processes by the hundred thousand)."""

    type: str
    id: str
    version: int
    last_updated: int
    raw: bytes
    patients: frozenset[str]
    content_hash: bytes | None = None
    """:func:`content_hash` of its content, when the store compares by it
    (``ResourceStore.hashes_content``) and the version was prepared for it."""
    key_hash: int | None = None
    """:func:`key_hash` of its type and id, when the store looks resources up by it
    (``ResourceStore.hashes_keys``) and the version was prepared for it."""


def new_version(
    resource: Mapping[str, Any],
    previous: tuple[int, bytes | None] | None,
    now: datetime,
    *,
    keep_last_updated: bool,
) -> NewVersion | None:
    """The version to store for ``resource``, or None when it equals ``previous``.

    ``previous`` is the current ``(version, raw)`` of the same resource (raw None when
    that version is a deletion).
    """
    type_ = resource.get("resourceType")
    id_ = resource.get("id")
    if not isinstance(type_, str) or not isinstance(id_, str):
        raise ValueError("a resource needs a string resourceType and id")
    content = content_without_meta(resource)
    if (
        previous is not None
        and previous[1] is not None
        and content_without_meta(orjson.loads(previous[1])) == content
    ):
        return None
    version = previous[0] + 1 if previous else 1
    given = (resource.get("meta") or {}).get("lastUpdated") if keep_last_updated else None
    stamp = parse_instant(given) if given else now
    meta = content.setdefault("meta", {})  # content_without_meta's own copy
    meta["versionId"] = str(version)
    meta["lastUpdated"] = given if given else fhir_instant(stamp)
    return NewVersion(
        type_,
        id_,
        version,
        int(stamp.timestamp() * 1_000_000),
        _right_sized(orjson.dumps(content)),
        patient_ids(content),
    )


@dataclass(frozen=True, slots=True)
class Stamp:
    """The ``lastUpdated`` of the versions one write creates, formatted once for all."""

    instant: str
    micros: int

    @classmethod
    def at(cls, moment: datetime) -> Stamp:
        return cls(fhir_instant(moment), int(moment.timestamp() * 1_000_000))

    @classmethod
    def pending(cls) -> Stamp:
        """A stand-in for versions prepared before their write: a random token as long
        as an instant. The store puts the time of the transaction that writes them in its
        place (:class:`Restamp`): a version must never commit with a lastUpdated older
        than an export snapshot taken before it, or the next export ``_since`` that
        snapshot's time would miss it."""
        return cls("pending-" + secrets.token_hex(8), 0)


@dataclass(frozen=True, slots=True)
class Restamp:
    """Stamps versions prepared with a pending stamp (:meth:`Stamp.pending`) at the time
    of the transaction that writes them, one stored JSON at a time: no second list of
    versions, and no tuple rebuilt per version."""

    old: bytes
    new: bytes
    micros: int

    @classmethod
    def of(cls, pending: Stamp, now: datetime) -> Restamp:
        stamp = Stamp.at(now)
        return cls(pending.instant.encode(), stamp.instant.encode(), stamp.micros)

    def raw(self, raw: bytes) -> bytes:
        return raw.replace(self.old, self.new)


def first_version(
    resource: dict[str, Any], stamp: Stamp, *, hashed: bool = False, keyed: bool = False
) -> NewVersion:
    """``resource`` as version 1 written at ``stamp``: exactly what :func:`new_version`
    makes of it when there is no previous version (a store that finds one after all hands
    the version back to :func:`new_version`). It takes ``resource`` over: the meta is
    stamped in place, which saves copying every freshly parsed line. ``hashed``: with its
    :func:`content_hash`; ``keyed``: with its :func:`key_hash`."""
    meta = resource.get("meta")
    if meta:  # a JSON object: the caller checked
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
    if not meta:  # as content_without_meta: no meta left, a new one goes last
        resource.pop("meta", None)
    digest = content_hash(resource) if hashed else None  # now it is content_without_meta
    if not meta:
        meta = resource["meta"] = {}
    meta["versionId"] = "1"
    meta["lastUpdated"] = stamp.instant
    return NewVersion(
        resource["resourceType"],
        resource["id"],
        1,
        stamp.micros,
        _right_sized(orjson.dumps(resource)),
        patient_ids(resource),
        digest,
        key_hash(resource["resourceType"], resource["id"]) if keyed else None,
    )
