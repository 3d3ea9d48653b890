"""``_typeFilter`` and ``_elements`` as the kick-off sends them → the stored model.

``_typeFilter`` values arrive URL-decoded once (by the HTTP layer, or as a Parameters
``valueString``). One value may hold several queries joined with commas, and a query's
own values are comma lists too (``Observation?category=a,b``): a comma starts a new query
only where a resource type and ``?`` follow it. Inside a query, names and values are
URL-decoded once more (clients such as smart-fetch encode a query's commas as ``%2C`` to
keep them apart from the list's), ``+`` is kept as a plus (time zones), and ``\\,``
escapes a comma inside a value, as FHIR search does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

from exportsvc.fhir.compartment import RESOURCE_TYPES
from exportsvc.search.matcher import FilterError, compile_filters
from exportsvc.search.model import Criterion, TypeFilter
from exportsvc.search.values import split_escaped

__all__ = ["ElementsError", "parse_elements", "parse_type_filter", "split_type_filters"]

RESULT_PARAMETERS = frozenset(
    {
        "_sort",
        "_count",
        "_include",
        "_revinclude",
        "_summary",
        "_total",
        "_elements",
        "_contained",
        "_containedType",
        "_format",
        "_pretty",
    }
)
"""FHIR search result parameters: a ``_typeFilter`` SHALL NOT use them (Bulk Data IG)."""

_NEXT_QUERY = re.compile(r",(?=[A-Z][A-Za-z]*\?)")
_ELEMENT = re.compile(r"[a-z][A-Za-z0-9]*")


def split_type_filters(values: Iterable[str]) -> list[str]:
    """Every query in the ``_typeFilter`` values, in order."""
    return [q for value in values for q in _NEXT_QUERY.split(value) if q.strip()]


def parse_type_filter(text: str) -> TypeFilter:
    """One ``Type?name=value&...`` query, checked against what the matcher supports."""
    type_, question, query = text.strip().partition("?")
    if not question:
        raise FilterError("it is not of the form ResourceType?parameter=value")
    if type_ not in RESOURCE_TYPES:
        raise FilterError(f"{type_!r} is not a FHIR R4 resource type")
    criteria: list[Criterion] = []
    for part in query.split("&"):
        if not part:
            continue
        raw_name, equals, raw_value = part.partition("=")
        name, value = unquote(raw_name), unquote(raw_value)
        if not equals or not name:
            raise FilterError(f"{part!r} is not name=value")
        name, _, modifier = name.partition(":")
        if name in RESULT_PARAMETERS:
            raise FilterError(f"the search result parameter {name} is not allowed in _typeFilter")
        if "." in name or name == "_has" or modifier.count(".") or ":" in modifier:
            raise FilterError(f"chained search ({part!r}) is not supported", unsupported=True)
        values = [v.replace("\\,", ",") for v in split_escaped(value, ",")]
        criteria.append(Criterion(name=name, modifier=modifier or None, values=values))
    if not criteria:
        raise FilterError("it has no search parameters")
    parsed = TypeFilter(type=type_, criteria=criteria, query=text.strip())
    compile_filters([parsed])  # refuses what the matcher cannot evaluate
    return parsed


class ElementsError(ValueError):
    """An ``_elements`` entry that is not ``element`` or ``Type.element``."""


def parse_elements(values: Sequence[str]) -> list[str]:
    """``_elements`` comma lists → ``["Patient.name", "id", ...]`` (deduplicated).

    Only root elements are allowed (the Bulk Data IG says so): ``name``, ``Patient.name``,
    a choice element as ``value`` or ``value[x]`` (both keep ``valueQuantity``...).
    """
    out: list[str] = []
    for value in values:
        for entry in value.split(","):
            entry = entry.strip().removesuffix("[x]")
            if not entry:
                continue
            type_, dot, element = entry.rpartition(".")
            if dot and type_ not in RESOURCE_TYPES:
                problem = "only root elements are allowed" if "." in type_ else "unknown type"
                raise ElementsError(f"_elements {entry!r}: {problem}")
            if not _ELEMENT.fullmatch(element):
                raise ElementsError(f"_elements {entry!r} is not an element name")
            if entry not in out:
                out.append(entry)
    return out
