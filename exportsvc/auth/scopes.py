"""SMART system scopes: parsing, granting, and what a set of scopes lets a client do.

Pure functions, no I/O. A scope is ``system/<Type or *>.<permissions>`` with SMART v1
permissions (``read``, ``write``, ``*``) or v2 ones (a subsequence of ``cruds``). Scopes of
another context (``patient/``, ``user/``), unknown types, v2 query suffixes
(``?category=...``) and anything else this service cannot enforce are not understood:
:func:`parse_scope` returns ``None`` and they are never granted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from exportsvc.fhir.compartment import RESOURCE_TYPES

V2_ORDER = "cruds"
V1_PERMISSIONS = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset(V2_ORDER)}
READ = frozenset("rs")
"""An export reads and searches: ``system/<Type>.read`` (v1) or ``.rs`` (v2)."""
WRITE = frozenset("cu")
"""An import creates and updates: ``system/<Type>.write`` (v1) or ``.cu`` (v2)."""
SCOPES_SUPPORTED = ("system/*.read", "system/*.rs", "system/*.write", "system/*.cu")


@dataclass(frozen=True)
class Scope:
    text: str
    resource: str
    """A resource type, or ``*`` for all of them."""
    permissions: frozenset[str]


def parse_scope(text: str) -> Scope | None:
    context, slash, rest = text.partition("/")
    resource, dot, permissions = rest.partition(".")
    if context != "system" or not slash or not dot:
        return None
    if resource != "*" and resource not in RESOURCE_TYPES:
        return None
    if permissions in V1_PERMISSIONS:
        return Scope(text, resource, V1_PERMISSIONS[permissions])
    canonical = "".join(p for p in V2_ORDER if p in permissions)
    if not permissions or permissions != canonical:
        return None
    return Scope(text, resource, frozenset(permissions))


def parse_scopes(texts: Iterable[str]) -> list[Scope]:
    """The understood scopes among ``texts`` (the rest dropped), without duplicates."""
    seen: dict[str, Scope] = {}
    for text in texts:
        scope = parse_scope(text)
        if scope is not None:
            seen.setdefault(text, scope)
    return list(seen.values())


def invalid_scopes(texts: Iterable[str]) -> list[str]:
    return [text for text in texts if parse_scope(text) is None]


def grant(requested: str, allowed: Iterable[str]) -> list[str]:
    """The requested scopes (a space-separated ``scope`` parameter) that the client's
    allowed scopes cover, in the order asked; a narrower request than allowed is granted
    as asked (``system/Patient.rs`` under ``system/*.read``)."""
    held = _Held(allowed)
    return [s.text for s in parse_scopes(requested.split()) if s.permissions <= held(s.resource)]


def permitted_types(scopes: Iterable[str], needed: frozenset[str]) -> frozenset[str] | None:
    """The resource types the scopes grant ``needed`` on; ``None`` means every type."""
    held = _Held(scopes)
    if needed <= held("*"):
        return None
    return frozenset(t for t in held.resources if needed <= held(t))


class _Held:
    """Permissions held on a resource type (``*``: on every type), all scopes summed:
    ``system/*.r system/*.s`` hold ``rs`` as much as ``system/*.rs`` does."""

    def __init__(self, scopes: Iterable[str]) -> None:
        self._by_resource: dict[str, frozenset[str]] = {}
        for scope in parse_scopes(scopes):
            before = self._by_resource.get(scope.resource, frozenset())
            self._by_resource[scope.resource] = before | scope.permissions
        self.resources = {r for r in self._by_resource if r != "*"}

    def __call__(self, resource: str) -> frozenset[str]:
        everywhere = self._by_resource.get("*", frozenset())
        return everywhere | self._by_resource.get(resource, frozenset())
