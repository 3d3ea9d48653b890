"""Pure helpers shared by every resource store backend: versions, meta, time columns."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from exportsvc.fhir.compartment import patient_ids


def fhir_instant(moment: datetime) -> str:
    """A FHIR ``instant`` in UTC with milliseconds: ``2024-01-02T03:04:05.678Z``."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"instant without a time zone: {text!r}")
    return moment


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


class NewVersion(NamedTuple):
    """A version ready to insert. A tuple: cheap to build and to pickle (seeding sends
    them between processes by the hundred thousand)."""

    type: str
    id: str
    version: int
    last_updated: int
    raw: bytes
    patients: frozenset[str]


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
        orjson.dumps(content),
        patient_ids(content),
    )
