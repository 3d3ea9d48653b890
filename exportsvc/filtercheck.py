"""The DataValidator's own reading of ``_typeFilter`` and ``_elements``.

The export decides with the store's query (``_lastUpdated`` and ``_id`` pushed down),
the FHIRPath evaluator and the matcher of :mod:`exportsvc.search`. The validator must not
share that path, or a bug in it would pass unnoticed; it shares only the parsed filter
(the request's ``TypeFilter`` models) and the R4 definitions (which elements a parameter
indexes). From there it does the plain thing, written out again: the definition's
expression is read as key paths (``Observation.effective`` → ``effectiveDateTime``,
``effectivePeriod``...), dates become ``datetime`` intervals, and each prefix, token and
string rule is coded as the FHIR R4 search page words it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any

from exportsvc.fhir.fhirpath import CHOICE_TYPES
from exportsvc.search.model import Criterion, TypeFilter

_DEFINITIONS: dict[str, dict[str, dict[str, Any]]] = json.loads(
    files("exportsvc.fhir").joinpath("data", "search-parameters.json").read_text()
)["parameters"]

Path = list[tuple[str, str | None]]  # (element, cast type or None)
TAG_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"


def _definition(type_: str, name: str) -> dict[str, Any]:
    found = _DEFINITIONS.get(type_, {}).get(name) or _DEFINITIONS["Resource"].get(name)
    if found is None:
        raise KeyError(f"{type_} has no search parameter {name}")
    return found


def _paths(expression: str) -> list[tuple[Path, str | None]]:
    """Each alternative of the expression as key steps, and its resolve() target type."""
    out = []
    depth, start, alternatives = 0, 0, []
    for at, char in enumerate(expression):
        depth += (char == "(") - (char == ")")
        if char == "|" and depth == 0:
            alternatives.append(expression[start:at])
            start = at + 1
    alternatives.append(expression[start:])
    for text in alternatives:
        target = None
        where = re.search(r"\.where\(resolve\(\) is (\w+)\)", text)
        if where:
            target = where.group(1)
            text = text.replace(where.group(0), "")
        text = re.sub(r"\.(?:as|ofType)\((\w+)\)", r"#\1", text)
        text = re.sub(r" as (\w+)", r"#\1", text)
        steps: Path = []
        for part in text.replace("(", "").replace(")", "").strip().split(".")[1:]:
            name, _, cast = part.partition("#")
            steps.append((name, cast or None))
        out.append((steps, target))
    return out


def _walk(value: Any, steps: Path) -> Iterator[Any]:
    if not steps:
        if isinstance(value, list):
            yield from value
        else:
            yield value
        return
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, steps)
        return
    if not isinstance(value, dict):
        return
    (name, cast), rest = steps[0], steps[1:]
    if cast is not None:
        key = name + cast[0].upper() + cast[1:]
        if key in value:
            yield from _walk(value[key], rest)
        return
    if name in value:
        yield from _walk(value[name], rest)
        return
    for suffix in CHOICE_TYPES:
        if name + suffix in value:
            yield from _walk(value[name + suffix], rest)


def values_of(resource: Mapping[str, Any], type_: str, name: str) -> list[Any]:
    """What parameter ``name`` indexes in ``resource``."""
    out = []
    for steps, target in _paths(_definition(type_, name)["expression"]):
        for value in _walk(dict(resource), steps):
            if target is not None:
                ref = value.get("reference", "") if isinstance(value, dict) else ""
                if ref.split("/_history/")[0].split("/")[-2:-1] != [target]:
                    continue
            out.append(value)
    return out


# -- dates as datetime intervals -----------------------------------------------------------


def _interval(text: str) -> tuple[datetime, datetime] | None:
    try:
        if re.fullmatch(r"\d{4}", text):
            year = int(text)
            return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
        if re.fullmatch(r"\d{4}-\d{2}", text):
            year, month = int(text[:4]), int(text[5:])
            start = datetime(year, month, 1, tzinfo=UTC)
            return start, (start + timedelta(days=32)).replace(day=1)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            start = datetime.fromisoformat(text).replace(tzinfo=UTC)
            return start, start + timedelta(days=1)
        body = re.sub(r"(Z|[+-]\d{2}:\d{2})$", "", text)
        zone = text[len(body) :] or "Z"
        whole, _, fraction = body.partition(".")
        start = datetime.fromisoformat(whole + "+00:00" if zone == "Z" else whole + zone)
        if fraction:
            start += timedelta(microseconds=int(fraction[:6].ljust(6, "0")))
            width = timedelta(microseconds=10 ** max(0, 6 - len(fraction)))
        elif whole.count(":") == 1:
            width = timedelta(minutes=1)
        else:
            width = timedelta(seconds=1)
        return start, start + width
    except ValueError:
        return None


def _target_interval(value: Any) -> tuple[datetime, datetime] | None:
    if isinstance(value, str):
        return _interval(value)
    if isinstance(value, dict) and ("start" in value or "end" in value):
        first = _interval(value["start"]) if "start" in value else None
        last = _interval(value["end"]) if "end" in value else None
        low = first[0] if first else datetime.min.replace(tzinfo=UTC)
        high = last[1] if last else datetime.max.replace(tzinfo=UTC)
        return low, high
    return None


def _date_matches(query: str, value: Any) -> bool:
    prefix = query[:2] if query[:2].isalpha() else "eq"
    search = _interval(query[2:] if query[:2].isalpha() else query)
    target = _target_interval(value)
    if search is None or target is None:
        return False
    (s_low, s_high), (t_low, t_high) = search, target
    contained = s_low <= t_low and t_high <= s_high
    above_overlaps = t_high > s_high  # [s_high, ∞) meets [t_low, t_high)
    below_overlaps = t_low < s_low  # (-∞, s_low) meets [t_low, t_high)
    return {
        "eq": contained,
        "ne": not contained,
        "gt": above_overlaps,
        "lt": below_overlaps,
        "ge": above_overlaps or contained,
        "le": below_overlaps or contained,
        "sa": t_low >= s_high,
        "eb": t_high <= s_low,
    }[prefix]


# -- tokens, references, strings -----------------------------------------------------------


def _pairs(value: Any) -> list[tuple[str | None, str]]:
    if isinstance(value, bool):
        return [(None, str(value).lower())]
    if isinstance(value, str | int):
        return [(None, str(value))]
    if not isinstance(value, dict):
        return []
    if "coding" in value:
        return [p for coding in value["coding"] for p in _pairs(coding)]
    if "code" in value:
        return [(value.get("system"), str(value["code"]))]
    if "value" in value:
        return [(value.get("system"), str(value["value"]))]
    return []


def _token_matches(query: str, value: Any) -> bool:
    parts = re.split(r"(?<!\\)\|", query, maxsplit=1)
    parts = [p.replace("\\|", "|").replace("\\$", "$").replace("\\\\", "\\") for p in parts]
    for system, code in _pairs(value):
        if len(parts) == 1:
            hit = code == parts[0]
        elif parts[0] == "":
            hit = system is None and code == parts[1]
        else:
            hit = system == parts[0] and parts[1] in ("", code)
        if hit:
            return True
    return False


def _reference_matches(query: str, modifier: str | None, value: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        return False
    have = value["reference"].split("/_history/")[0].split("/")
    want = query.split("/_history/")[0].split("/")
    if have[-1] != want[-1]:
        return False
    want_type = modifier if modifier else (want[-2] if len(want) > 1 else None)
    return want_type is None or (len(have) > 1 and have[-2] == want_type)


def _fold(text: str) -> str:
    return "".join(
        c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)
    ).casefold()


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        found: list[str] = []
        for key, part in value.items():
            if key in ("use", "period", "extension", "id"):
                continue
            found += [part] if isinstance(part, str) else []
            found += [p for p in part if isinstance(p, str)] if isinstance(part, list) else []
        return found
    return []


def _string_matches(query: str, modifier: str | None, value: Any) -> bool:
    query = query.replace("\\$", "$").replace("\\|", "|").replace("\\\\", "\\")
    for text in _texts(value):
        if modifier == "exact" and text == query:
            return True
        if modifier == "contains" and _fold(query) in _fold(text):
            return True
        if modifier is None and _fold(text).startswith(_fold(query)):
            return True
    return False


def criterion_matches(resource: Mapping[str, Any], type_: str, criterion: Criterion) -> bool:
    kind = _definition(type_, criterion.name)["type"]
    found = values_of(resource, type_, criterion.name)
    if criterion.modifier == "missing":
        return (not found) == (criterion.values == ["true"])
    hit = False
    for query in criterion.values:
        for value in found:
            if kind == "token":
                hit = _token_matches(query, value)
            elif kind == "date":
                hit = _date_matches(query, value)
            elif kind == "reference":
                hit = _reference_matches(query, criterion.modifier, value)
            elif kind == "string":
                hit = _string_matches(query, criterion.modifier, value)
            else:
                hit = value == query
            if hit:
                break
        if hit:
            break
    return not hit if criterion.modifier == "not" else hit


def selected(resource: Mapping[str, Any], queries: Sequence[TypeFilter]) -> bool:
    """Does ``resource`` pass the queries of its type (any query, every criterion)?"""
    mine = [q for q in queries if q.type == resource.get("resourceType")]
    if not mine:
        return True
    return any(all(criterion_matches(resource, q.type, c) for c in q.criteria) for q in mine)


def expected_subset(resource: Mapping[str, Any], elements: Sequence[str]) -> dict[str, Any]:
    """The resource as ``_elements`` should export it (whole when no entry names its type)."""
    type_ = str(resource.get("resourceType"))
    names = {e.split(".")[-1] for e in elements if "." not in e or e.split(".")[0] == type_}
    if not names:
        return dict(resource)
    keep = {"resourceType", "id", "meta"}
    for key in resource:
        plain = key.lstrip("_")
        if plain in names or any(
            plain.startswith(n) and plain[len(n) :] in CHOICE_TYPES for n in names
        ):
            keep.add(key)
    out = {k: v for k, v in resource.items() if k in keep}
    meta = dict(out.get("meta") or {})
    tags = list(meta.get("tag") or [])
    if not any(t.get("system") == TAG_SYSTEM and t.get("code") == "SUBSETTED" for t in tags):
        tags.append({"system": TAG_SYSTEM, "code": "SUBSETTED"})
    meta["tag"] = tags
    out["meta"] = meta
    return out
