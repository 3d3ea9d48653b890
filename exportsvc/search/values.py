"""FHIR R4 search value syntax: escaped lists, tokens, and dates as ranges.

Dates follow FHIR's range semantics: every date, dateTime or instant stands for the
interval its precision implies (``2024`` is the whole year, ``2024-03-01T10:00:00Z`` that
second, ``...T10:00:00.123Z`` that millisecond). Intervals are half open, in integer
microseconds since the epoch: ``[low, high)``. A value without a time zone is read as UTC
(FHIR leaves local dates to the server; this one has no other zone to use).
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

__all__ = [
    "DATE_PREFIXES",
    "FOREVER",
    "NEVER",
    "date_range",
    "normalise",
    "split_escaped",
    "split_prefix",
    "target_range",
    "unescape",
]

NEVER = -(2**62)
FOREVER = 2**62
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_DATE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def split_escaped(text: str, separator: str) -> list[str]:
    """Split on ``separator`` where it is not escaped with a backslash (escapes kept)."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    """FHIR search escapes ``\\,``, ``\\|``, ``\\$`` and ``\\\\``."""
    return re.sub(r"\\([,|$\\])", r"\1", text)


def split_prefix(text: str) -> tuple[str, str]:
    """``ge2024-01`` → ("ge", "2024-01"); no prefix means ``eq``."""
    if text[:2] in DATE_PREFIXES and not text[:2].isdigit():
        return text[:2], text[2:]
    return "eq", text


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // _MICRO


def date_range(text: str) -> tuple[int, int] | None:
    """The interval a FHIR date, dateTime or instant stands for; None if it is none."""
    match = _DATE.fullmatch(text)
    if match is None:
        return None
    g = match.groupdict()
    year, month, day = int(g["y"]), int(g["m"] or 1), int(g["d"] or 1)
    tz = UTC
    if g["tz"] and g["tz"] != "Z":
        sign = -1 if g["tz"][0] == "-" else 1
        hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        if g["m"] is None:
            low = datetime(year, 1, 1, tzinfo=tz)
            high = datetime(year + 1, 1, 1, tzinfo=tz) if year < 9999 else None
        elif g["d"] is None:
            low = datetime(year, month, 1, tzinfo=tz)
            nxt = (year + 1, 1) if month == 12 else (year, month + 1)
            high = datetime(nxt[0], nxt[1], 1, tzinfo=tz) if nxt[0] <= 9999 else None
        else:
            hour, minute = int(g["H"] or 0), int(g["M"] or 0)
            second = int(g["S"] or 0)
            fraction = g["f"] or ""
            micro = int((fraction + "000000")[:6])
            low = datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
            if g["H"] is None:
                step = timedelta(days=1)
            elif g["S"] is None:
                step = timedelta(minutes=1)
            elif not fraction:
                step = timedelta(seconds=1)
            else:
                step = timedelta(microseconds=10 ** max(6 - len(fraction), 0))
            high = low + step
    except (ValueError, OverflowError):
        return None
    return _micros(low), _micros(high) if high is not None else FOREVER


def target_range(value: Any) -> tuple[int, int] | None:
    """The interval of a resource's date-like element: a date string or a Period."""
    if isinstance(value, str):
        return date_range(value)
    if isinstance(value, dict) and ("start" in value or "end" in value):
        start, end = value.get("start"), value.get("end")
        low = date_range(start) if isinstance(start, str) else None
        high = date_range(end) if isinstance(end, str) else None
        return (low[0] if low else NEVER), (high[1] if high else FOREVER)
    return None


def normalise(text: str) -> str:
    """Case- and accent-insensitive form for string search (``Müller`` → ``muller``)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
