"""Compiled ``_typeFilter`` queries: predicates over parsed resources.

A parameter is looked up in the R4 definitions (:mod:`exportsvc.fhir.search_params`); its
FHIRPath expression selects the values, and the parameter's kind says how a value
matches (FHIR R4 search, section 3.1.1):

- token — ``code``, ``system|code``, ``|code`` (no system), ``system|`` (any code of the
  system) against codes, Codings, CodeableConcepts, Identifiers and ContactPoints;
  ``:not`` negates the whole parameter;
- reference — ``Type/id``, ``id`` or an absolute URL; ``:Type`` restricts the target;
- date — ``eq ne gt lt ge le sa eb`` on intervals (see :mod:`.values`), against dates,
  dateTimes, instants and Periods;
- string — case- and accent-insensitive starts-with against strings, and against every
  string part of a HumanName or Address; ``:exact`` and ``:contains``;
- uri — exact match;
- ``:missing=true|false`` on any of them.

Values of one parameter are OR'd, parameters of one query AND'd, and several queries for
one type OR'd. :func:`store_bounds` tells what of a type's queries the store can evaluate
on indexed columns (``_lastUpdated``, ``_id``): a superset, which the predicate then
narrows on the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from exportsvc.fhir.fhirpath import Node, reference_parts
from exportsvc.fhir.search_params import SearchParam, search_param
from exportsvc.search.model import Criterion, TypeFilter
from exportsvc.search.values import (
    FOREVER,
    NEVER,
    date_range,
    normalise,
    split_prefix,
    target_range,
    unescape,
)

__all__ = ["FilterError", "Predicate", "StoreBounds", "TypeMatcher", "compile_filters"]

Resource = Mapping[str, Any]
Predicate = Callable[[Resource], bool]
ValueTest = Callable[[Any], bool]

MODIFIERS = {
    "token": {"not", "missing"},
    "reference": {"missing"},
    "date": {"missing"},
    "string": {"exact", "contains", "missing"},
    "uri": {"missing"},
}


class FilterError(ValueError):
    """A query this server cannot evaluate; the message names the parameter."""

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


# -- values of each kind ---------------------------------------------------------------


def _codes(value: Any) -> Iterable[tuple[str | None, str | None]]:
    """(system, code) pairs of a token-like value."""
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str | int):
        yield None, str(value)
    elif isinstance(value, Mapping):
        if isinstance(value.get("coding"), list):  # CodeableConcept
            for coding in value["coding"]:
                yield from _codes(coding)
        elif "code" in value:  # Coding
            yield value.get("system"), value.get("code")
        elif "value" in value:  # Identifier, ContactPoint
            yield value.get("system"), value.get("value")


ANY = object()


def _token_test(text: str) -> ValueTest:
    if "|" in text.replace("\\|", ""):
        system_part, code_part = _split_bar(text)
        system: object = system_part  # "" means: no system
        code: str | None = code_part or None
    else:
        system, code = ANY, unescape(text)
    if code is None and system == "":
        raise FilterError("a token '|' needs a system or a code")

    def test(value: Any) -> bool:
        for sys_t, code_t in _codes(value):
            if code is not None and code_t != code:
                continue
            if system is ANY or (system == "" and sys_t is None) or sys_t == system:
                return True
        return False

    return test


def _split_bar(text: str) -> tuple[str, str]:
    at = 0
    while True:
        at = text.index("|", at)
        if at == 0 or text[at - 1] != "\\":
            break
        at += 1
    return unescape(text[:at]), unescape(text[at + 1 :])


def _reference_test(text: str, param: SearchParam, type_modifier: str | None) -> ValueTest:
    want_type, want_id = reference_parts(text)
    if type_modifier is not None:
        if want_type is not None and want_type != type_modifier:
            raise FilterError(f"{param.name}:{type_modifier}={text}: the types differ")
        want_type = type_modifier
    if not want_id:
        raise FilterError(f"{param.name}={text}: not a reference")
    if want_type is not None and param.target and want_type not in param.target:
        targets = ", ".join(param.target)
        raise FilterError(f"{param.name} refers to {targets}, not {want_type}")

    def test(value: Any) -> bool:
        ref = value.get("reference") if isinstance(value, Mapping) else None
        if not isinstance(ref, str):
            return False
        got_type, got_id = reference_parts(ref)
        return got_id == want_id and (want_type is None or got_type == want_type)

    return test


def _date_test(text: str, param: SearchParam) -> ValueTest:
    prefix, rest = split_prefix(text)
    if text[:2] == "ap":
        raise FilterError(f"{param.name}: the prefix ap is not supported", unsupported=True)
    found = date_range(rest)
    if found is None:
        raise FilterError(f"{param.name}={text}: not a FHIR date (e.g. ge2024-01-31)")
    low, high = found

    def test(value: Any) -> bool:
        target = target_range(value)
        if target is None:
            return False
        t_low, t_high = target
        contains = low <= t_low and t_high <= high
        if prefix == "eq":
            return contains
        if prefix == "ne":
            return not contains
        if prefix == "gt":
            return t_high > high
        if prefix == "lt":
            return t_low < low
        if prefix == "ge":
            return t_high > high or contains
        if prefix == "le":
            return t_low < low or contains
        if prefix == "sa":
            return t_low >= high
        return t_high <= low  # eb

    return test


def _strings(value: Any) -> list[str]:
    """A string, or every string part of a complex value (HumanName, Address...)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Mapping):
        return []
    out: list[str] = []
    for key, part in value.items():
        if key in ("use", "period", "extension", "id"):
            continue
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, list):
            out.extend(p for p in part if isinstance(p, str))
    return out


def _string_test(text: str, modifier: str | None) -> ValueTest:
    if modifier == "exact":
        return lambda value: text in _strings(value)
    wanted = normalise(text)
    if modifier == "contains":
        return lambda value: any(wanted in normalise(s) for s in _strings(value))
    return lambda value: any(normalise(s).startswith(wanted) for s in _strings(value))


def _uri_test(text: str) -> ValueTest:
    return lambda value: value == text


# -- criteria, queries, types ---------------------------------------------------------


def _value_test(param: SearchParam, modifier: str | None, text: str) -> ValueTest:
    if param.kind == "token":
        return _token_test(text)  # unescapes after splitting system|code
    text = unescape(text)
    if param.kind == "reference":
        return _reference_test(text, param, modifier)
    if param.kind == "date":
        return _date_test(text, param)
    if param.kind == "string":
        return _string_test(text, modifier)
    return _uri_test(text)


def _criterion(type_: str, criterion: Criterion) -> Predicate:
    name, modifier = criterion.name, criterion.modifier
    param = search_param(type_, name)
    if param is None:
        raise FilterError(
            f"search parameter {name!r} is not supported for {type_}", unsupported=True
        )
    allowed = MODIFIERS[param.kind]
    type_modifier = param.kind == "reference" and modifier is not None and modifier[:1].isupper()
    if modifier is not None and modifier not in allowed and not type_modifier:
        raise FilterError(
            f"modifier :{modifier} of {name} ({param.kind}) is not supported", unsupported=True
        )
    values = [v for v in criterion.values if v != ""]
    if not values:
        raise FilterError(f"{name} has no value")
    evaluate = param.expression.evaluate
    if modifier == "missing":
        if values not in (["true"], ["false"]):
            raise FilterError(f"{name}:missing takes true or false")
        missing = values == ["true"]
        return lambda resource: (not evaluate(resource)) == missing
    tests = [_value_test(param, modifier, v) for v in values]

    def any_value(resource: Resource) -> bool:
        nodes: list[Node] = evaluate(resource)
        return any(test(node.value) for node in nodes for test in tests)

    if modifier == "not":
        return lambda resource: not any_value(resource)
    return any_value


def _query(query: TypeFilter) -> Predicate:
    parts = [_criterion(query.type, c) for c in query.criteria]
    return lambda resource: all(part(resource) for part in parts)


@dataclass(frozen=True, slots=True)
class StoreBounds:
    """What the store can select on its columns, a superset of the queries' matches."""

    since: datetime | None = None
    until: datetime | None = None
    ids: tuple[str, ...] | None = None


_SLACK = 1_000_000
"""One second of leeway on pushed-down times: the store's time column is rounded from
the instant through a float, and lastUpdated has at least second precision."""


def _time_bounds(values: Sequence[str]) -> tuple[int, int]:
    """Where the store's lastUpdated column can lie for ``_lastUpdated=v1,v2``."""
    low, high = FOREVER, NEVER
    for text in values:
        prefix, rest = split_prefix(text)
        found = date_range(rest)
        if found is None:
            return NEVER, FOREVER
        s_low, s_high = found
        bounds = {
            "eq": (s_low, s_high),
            "gt": (s_high, FOREVER),
            "sa": (s_high, FOREVER),
            "ge": (s_low, FOREVER),
            "lt": (NEVER, s_low),
            "eb": (NEVER, s_low),
            "le": (NEVER, s_high),
        }.get(prefix, (NEVER, FOREVER))
        low, high = min(low, bounds[0]), max(high, bounds[1])
    return low - _SLACK, high + _SLACK


def _to_datetime(micros: int) -> datetime | None:
    if micros <= NEVER + _SLACK or micros >= FOREVER - _SLACK:
        return None
    try:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    except OverflowError:
        return None


def store_bounds(queries: Sequence[TypeFilter]) -> StoreBounds:
    if not queries:
        return StoreBounds()
    low, high = FOREVER, NEVER
    ids: set[str] | None = set()
    for query in queries:
        q_low, q_high, q_ids = NEVER, FOREVER, None
        for c in query.criteria:
            if c.modifier is not None:
                continue
            if c.name == "_lastUpdated":
                c_low, c_high = _time_bounds(c.values)
                q_low, q_high = max(q_low, c_low), min(q_high, c_high)
            elif c.name == "_id" and all("|" not in v for v in c.values):
                q_ids = set(c.values) if q_ids is None else q_ids & set(c.values)
        low, high = min(low, q_low), max(high, q_high)
        ids = None if ids is None or q_ids is None else ids | q_ids
    return StoreBounds(
        since=_to_datetime(low),
        until=_to_datetime(high),
        ids=tuple(sorted(ids)) if ids is not None else None,
    )


@dataclass(frozen=True, slots=True)
class TypeMatcher:
    """The queries of one type: a resource matches when any of them does."""

    type: str
    predicates: tuple[Predicate, ...]
    bounds: StoreBounds

    def matches(self, resource: Resource) -> bool:
        return any(predicate(resource) for predicate in self.predicates)


def compile_filters(queries: Sequence[TypeFilter]) -> dict[str, TypeMatcher]:
    """A matcher per filtered type; raises :class:`FilterError` for what is not supported."""
    by_type: dict[str, list[TypeFilter]] = {}
    for query in queries:
        by_type.setdefault(query.type, []).append(query)
    return {
        type_: TypeMatcher(type_, tuple(_query(q) for q in group), store_bounds(group))
        for type_, group in by_type.items()
    }
