"""Resources prepared for the PostgreSQL merge: everything of a new version but its number.

:meth:`PostgresResourceStore.write` stages every resource of a batch in a temporary table
and lets one ``INSERT ... SELECT`` number the versions. The stored bytes carry
``meta.versionId``, which only the merge knows, so a resource is staged as the bytes
before and after that number (``head`` and ``tail``): the merge stores
``head || version || tail``, byte for byte what :func:`datastore.versioning.new_version`
makes. Whether content changed is decided there too, on :func:`content_hash`.

A version the store stamps is staged before the write lock is taken, but must be stamped
with a time after it (``ResourceStore.snapshot``): it is staged with a pending stamp
(:meth:`Stamp.pending`, as long as an instant) whose place in ``tail`` it records
(``stamp_at``), and the merge puts the instant of its transaction there.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from datastore.versioning import Stamp, content_hash, content_without_meta, parse_instant
from exportsvc.fhir.compartment import patient_ids


class Staged(NamedTuple):
    """A resource ready to stage: its version's bytes are ``head + str(version) + tail``."""

    type: str
    id: str
    last_updated: int
    head: bytes
    tail: bytes
    content_hash: bytes
    patients: frozenset[str]
    stamp_at: int | None
    """Where ``tail`` holds the write's stamp, 1-based (PostgreSQL's ``overlay``); None
    when the resource keeps its own lastUpdated."""


def stage(
    resource: Mapping[str, Any], stamp: Stamp, *, keep_last_updated: bool, marker: str
) -> Staged:
    """``resource`` as a version whose number the store assigns (``new_version``'s rules
    for ``meta`` and ``lastUpdated``), written at ``stamp`` unless it keeps its own
    lastUpdated. ``marker`` stands in for the number while the bytes are made: any string
    (a random one per batch) the resource does not contain; another is drawn when it
    does."""
    type_ = resource.get("resourceType")
    id_ = resource.get("id")
    if not isinstance(type_, str) or not isinstance(id_, str):
        raise ValueError("a resource needs a string resourceType and id")
    content = content_without_meta(resource)
    digest = content_hash(content)
    given = (resource.get("meta") or {}).get("lastUpdated") if keep_last_updated else None
    meta = content.setdefault("meta", {})  # content_without_meta's own copy
    while True:
        meta["versionId"] = marker
        meta["lastUpdated"] = given if given else stamp.instant
        head, _, tail = orjson.dumps(content).partition(marker.encode())
        if marker.encode() not in tail:  # (head cannot hold it: the first one splits)
            break
        marker = new_marker()
    if given:
        micros, stamp_at = int(parse_instant(given).timestamp() * 1_000_000), None
    else:  # lastUpdated comes right after versionId: the first one in tail
        micros, stamp_at = stamp.micros, tail.index(stamp.instant.encode()) + 1
    return Staged(type_, id_, micros, head, tail, digest, patient_ids(content), stamp_at)


def new_marker() -> str:
    return secrets.token_hex(16)


PENDING_STAMP_AT = len(b'","lastUpdated":"') + 1
"""Where the tail of a first version stamped with a pending stamp holds it (1-based)."""


def first_version_marker(pending: Stamp) -> bytes:
    """What :func:`datastore.versioning.first_version` ends a meta with when it stamps
    it with ``pending``: the version number, then the pending stamp, a random token that
    no input holds, so the marker is found once and only there."""
    return b'"versionId":"1","lastUpdated":"' + pending.instant.encode()


def split_first_version(raw: bytes, marker: bytes) -> tuple[bytes, bytes]:
    """A first version's bytes (``marker``: :func:`first_version_marker`) as ``head`` and
    ``tail`` around its version number, as :func:`stage` makes them, without parsing."""
    at = raw.find(marker)
    if at < 0:
        raise ValueError("a version without the pending stamp of its write")
    number = at + len(b'"versionId":"')
    return raw[:number], raw[number + 1 :]
