"""Group membership: the Patients an ``actual`` Group lists (inactive members excluded)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def member_ids(group: Mapping[str, Any]) -> list[str]:
    ids: list[str] = []
    for member in group.get("member") or []:
        if not isinstance(member, Mapping) or member.get("inactive"):
            continue
        reference = str((member.get("entity") or {}).get("reference") or "")
        type_, _, id_ = reference.rpartition("/")
        if (type_ == "Patient" or type_.endswith("/Patient")) and id_:
            ids.append(id_)
    return ids
