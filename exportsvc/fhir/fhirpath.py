"""A small evaluator for the FHIRPath expressions of FHIR R4 search parameter definitions.

Search parameters say which elements they index with expressions such as
``Observation.code``, ``Observation.effective``, ``(Observation.effective as dateTime)``,
``Condition.onset.as(dateTime)``, ``Condition.onset.ofType(Period)``,
``Patient.name.family | Practitioner.name.family`` and
``Observation.subject.where(resolve() is Patient)``. This module compiles exactly that
subset: paths from a resource type (or ``Resource``), unions, the ``as``/``ofType`` type
filters, and ``where(resolve() is Type)`` on references. Anything else is refused with
:class:`UnsupportedExpression`, so a definition the evaluator cannot honour is never half
applied.

Evaluation works on parsed JSON. Lists are flattened at every step, as FHIRPath does. A
choice element (``effective[x]``) is stored in JSON as ``effectiveDateTime``,
``effectivePeriod`` ...: navigating ``effective`` yields each of them, tagged with its
type, which ``as``/``ofType`` then select (case-insensitively, so ``dateTime`` and
``DateTime`` are the same type).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Compiled", "Node", "UnsupportedExpression", "compile_expression", "reference_parts"]


class UnsupportedExpression(ValueError):
    """The expression uses FHIRPath this evaluator does not implement."""


@dataclass(frozen=True, slots=True)
class Node:
    value: Any
    type: str | None = None
    """The FHIR type, where the JSON key told it (a choice element's suffix)."""


Step = Callable[[list[Node]], list[Node]]

# The R4 data types a choice element ([x]) can take, as its JSON key spells them: a key
# like ``statusReason`` is an element of its own, not ``status`` of type "Reason".
CHOICE_TYPES = frozenset(
    {
        "Base64Binary",
        "Boolean",
        "Canonical",
        "Code",
        "Date",
        "DateTime",
        "Decimal",
        "Id",
        "Instant",
        "Integer",
        "Markdown",
        "Oid",
        "PositiveInt",
        "String",
        "Time",
        "UnsignedInt",
        "Uri",
        "Url",
        "Uuid",
        "Address",
        "Age",
        "Annotation",
        "Attachment",
        "CodeableConcept",
        "Coding",
        "ContactPoint",
        "Count",
        "Distance",
        "Duration",
        "HumanName",
        "Identifier",
        "Money",
        "Period",
        "Quantity",
        "Range",
        "Ratio",
        "Reference",
        "SampledData",
        "Signature",
        "Timing",
        "ContactDetail",
        "Contributor",
        "DataRequirement",
        "Expression",
        "ParameterDefinition",
        "RelatedArtifact",
        "TriggerDefinition",
        "UsageContext",
        "Dosage",
        "Meta",
    }
)

_TOKEN = re.compile(
    r"\s*(?:(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<sym>[().|])|(?P<other>\S))",
)


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:  # trailing whitespace
            break
        if match.group("other"):
            raise UnsupportedExpression(f"unexpected {match.group('other')!r} in {text!r}")
        out.append(match.group("ident") or match.group("sym"))
        pos = match.end()
    return out


def reference_parts(reference: str) -> tuple[str | None, str]:
    """``[base/]Type/id[/_history/v]`` → (Type, id); a bare id → (None, id)."""
    head = reference.split("/_history/", 1)[0]
    parts = head.rstrip("/").split("/")
    if len(parts) >= 2:
        return parts[-2], parts[-1]
    return None, parts[-1]


def _child(name: str) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        out: list[Node] = []
        for node in nodes:
            value = node.value
            if not isinstance(value, Mapping):
                continue
            if name in value:
                _extend(out, value[name], None)
                continue
            size = len(name)
            for key, item in value.items():  # a choice element: name + Type
                if key.startswith(name) and key[size:] in CHOICE_TYPES:
                    _extend(out, item, key[size:])
        return out

    return step


def _extend(out: list[Node], value: Any, type_: str | None) -> None:
    if isinstance(value, list):
        out.extend(Node(v, type_) for v in value if v is not None)
    elif value is not None:
        out.append(Node(value, type_))


def _of_type(type_name: str) -> Step:
    wanted = type_name.lower()

    def step(nodes: list[Node]) -> list[Node]:
        # Without a type tag the JSON does not tell the type: the element is not a
        # choice, so its declared type is the one the definition names.
        return [n for n in nodes if n.type is None or n.type.lower() == wanted]

    return step


def _resolves_to(type_name: str) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        out = []
        for node in nodes:
            value = node.value
            ref = value.get("reference") if isinstance(value, Mapping) else None
            if isinstance(ref, str) and reference_parts(ref)[0] == type_name:
                out.append(node)
        return out

    return step


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0

    def peek(self, offset: int = 0) -> str | None:
        at = self.pos + offset
        return self.tokens[at] if at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise UnsupportedExpression(f"expected {expected or 'more'} in {self.text!r}")
        self.pos += 1
        return token

    def union(self) -> list[tuple[str, list[Step]]]:
        paths = self.term()
        while self.peek() == "|":
            self.take("|")
            paths += self.term()
        return paths

    def term(self) -> list[tuple[str, list[Step]]]:
        if self.peek() == "(":
            self.take("(")
            paths = self.union()
            self.take(")")
        else:
            root = self.take()
            if not root[0].isupper():
                raise UnsupportedExpression(f"{self.text!r} does not start at a resource type")
            paths = [(root, [])]
        steps = self.steps()
        if self.peek() == "as":  # the operator form: (X.y as Type)
            self.take("as")
            steps.append(_of_type(self.take()))
        return [(root, [*path, *steps]) for root, path in paths]

    def steps(self) -> list[Step]:
        steps: list[Step] = []
        while self.peek() == ".":
            self.take(".")
            name = self.take()
            if self.peek() != "(":
                steps.append(_child(name))
                continue
            self.take("(")
            if name in ("as", "ofType"):
                steps.append(_of_type(self.take()))
            elif name == "where" and self.tokens[self.pos : self.pos + 4] == [
                "resolve",
                "(",
                ")",
                "is",
            ]:
                self.pos += 4
                steps.append(_resolves_to(self.take()))
            else:
                raise UnsupportedExpression(f"function {name}() in {self.text!r}")
            self.take(")")
        return steps


@dataclass(frozen=True, slots=True)
class Compiled:
    """A compiled expression: ``evaluate(resource)`` is the list of values it selects."""

    text: str
    paths: tuple[tuple[str, tuple[Step, ...]], ...]

    def evaluate(self, resource: Mapping[str, Any]) -> list[Node]:
        rtype = resource.get("resourceType")
        out: list[Node] = []
        for root, steps in self.paths:
            if root != rtype and root not in ("Resource", "DomainResource"):
                continue
            nodes = [Node(resource)]
            for step in steps:
                nodes = step(nodes)
                if not nodes:
                    break
            out.extend(nodes)
        return out


def compile_expression(text: str) -> Compiled:
    parser = _Parser(text)
    paths = parser.union()
    if parser.peek() is not None:
        raise UnsupportedExpression(f"unexpected {parser.peek()!r} in {text!r}")
    if any(not steps for _, steps in paths):
        raise UnsupportedExpression(f"{text!r} selects a whole resource")
    return Compiled(text, tuple((root, tuple(steps)) for root, steps in paths))
