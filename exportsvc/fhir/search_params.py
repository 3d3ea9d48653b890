"""The FHIR R4 search parameters this server evaluates (``data/search-parameters.json``).

The file is generated from the R4 definitions by
:mod:`exportsvc.fhir.build_search_parameters` (see there for its source); each entry has
the parameter's kind and its FHIRPath expression for one resource type, compiled here once.
Parameters defined on ``Resource`` (``_id``, ``_lastUpdated``, ``_tag``...) apply to every
type.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from types import MappingProxyType
from typing import Final

from exportsvc.fhir.fhirpath import Compiled, compile_expression

__all__ = ["SEARCH_PARAMETERS", "SearchParam", "parameters_of", "search_param"]


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    base: str
    """The resource type it is defined on, or ``Resource``."""
    kind: str
    """token, reference, date, string or uri."""
    expression: Compiled
    id: str
    """The R4 SearchParameter id (``http://hl7.org/fhir/SearchParameter/{id}``)."""
    target: tuple[str, ...] = ()


def _load() -> dict[str, dict[str, SearchParam]]:
    text = files("exportsvc.fhir").joinpath("data", "search-parameters.json").read_text()
    table: dict[str, dict[str, SearchParam]] = {}
    for base, params in json.loads(text)["parameters"].items():
        table[base] = {
            name: SearchParam(
                name,
                base,
                spec["type"],
                compile_expression(spec["expression"]),
                spec["id"],
                tuple(spec.get("target", ())),
            )
            for name, spec in params.items()
        }
    return table


SEARCH_PARAMETERS: Final[Mapping[str, Mapping[str, SearchParam]]] = MappingProxyType(_load())


def search_param(type_: str, name: str) -> SearchParam | None:
    """The definition of ``name`` for ``type_``: its own, else the ``Resource`` one."""
    own = SEARCH_PARAMETERS.get(type_, {}).get(name)
    return own if own is not None else SEARCH_PARAMETERS["Resource"].get(name)


def parameters_of(type_: str) -> dict[str, SearchParam]:
    """Every parameter usable in a ``_typeFilter`` on ``type_``."""
    return {**SEARCH_PARAMETERS["Resource"], **SEARCH_PARAMETERS.get(type_, {})}
