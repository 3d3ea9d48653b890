"""Resources prepared for the PostgreSQL merge: everything of a new version but its number.

:meth:`PostgresResourceStore.write` stages every resource of a batch in a temporary table
and lets one ``INSERT ... SELECT`` number the versions. The stored bytes carry
``meta.versionId``, which only the merge knows, so a resource is staged as the bytes
before and after that number (``head`` and ``tail``): the merge stores
``head || version || tail``, byte for byte what :func:`datastore.versioning.new_version`
makes. Whether content changed is decided there too, on :func:`content_hash`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from datastore.versioning import content_without_meta, fhir_instant, parse_instant
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


def content_hash(content: Mapping[str, Any]) -> bytes:
    """The hash two versions share exactly when their contents (without the server's
    meta: ``content_without_meta``) are the same JSON: objects compared whatever their
    key order, every value as parsed, so ``1`` and ``1.0`` differ as their bytes do."""
    canonical = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).digest()


def stage(
    resource: Mapping[str, Any], now: datetime, *, keep_last_updated: bool, marker: str
) -> Staged:
    """``resource`` as a version whose number the store assigns (``new_version``'s rules
    for ``meta`` and ``lastUpdated``). ``marker`` stands in for the number while the
    bytes are made: any string (a random one per batch) the resource does not contain;
    another is drawn when it does."""
    type_ = resource.get("resourceType")
    id_ = resource.get("id")
    if not isinstance(type_, str) or not isinstance(id_, str):
        raise ValueError("a resource needs a string resourceType and id")
    content = content_without_meta(resource)
    digest = content_hash(content)
    given = (resource.get("meta") or {}).get("lastUpdated") if keep_last_updated else None
    stamp = parse_instant(given) if given else now
    meta = content.setdefault("meta", {})  # content_without_meta's own copy
    while True:
        meta["versionId"] = marker
        meta["lastUpdated"] = given if given else fhir_instant(stamp)
        head, _, tail = orjson.dumps(content).partition(marker.encode())
        if marker.encode() not in tail:  # (head cannot hold it: the first one splits)
            break
        marker = new_marker()
    return Staged(
        type_,
        id_,
        int(stamp.timestamp() * 1_000_000),
        head,
        tail,
        digest,
        patient_ids(content),
    )


def new_marker() -> str:
    return secrets.token_hex(16)
