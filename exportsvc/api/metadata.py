"""``GET /metadata``: the CapabilityStatement real clients read before an export."""

from __future__ import annotations

from importlib.metadata import version

import orjson
from aiohttp import web

from exportsvc.api.keys import base_url
from exportsvc.auth.oauth import capability_security
from exportsvc.fhir.compartment import PATIENT_COMPARTMENT, RESOURCE_TYPES
from exportsvc.fhir.provenance import PROVENANCE_VALUES
from exportsvc.fhir.search_params import parameters_of
from exportsvc.params import KNOWN

routes = web.RouteTableDef()
BULK = "http://hl7.org/fhir/uv/bulkdata"


def _search_params(type_: str) -> list[dict[str, str]]:
    """The parameters a ``_typeFilter`` on ``type_`` may use (this server has no search
    interaction: they are listed for ``_typeFilter``)."""
    return [
        {
            "name": name,
            "definition": f"http://hl7.org/fhir/SearchParameter/{param.id}",
            "type": param.kind,
        }
        for name, param in sorted(parameters_of(type_).items())
    ]


def export_parameters() -> str:
    """The kick-off parameters and preferences this server implements (from the parser,
    so the statement never claims one it refuses)."""
    names = sorted(KNOWN - {"_container"}, key=lambda n: n.lstrip("_").lower())
    described = {
        "includeAssociatedData": f"includeAssociatedData ({', '.join(sorted(PROVENANCE_VALUES))})",
        "patient": "patient (POST, Patient and Group level)",
        "organizeOutputBy": "organizeOutputBy (Patient)",
        "allowPartialManifests": "allowPartialManifests (true, false)",
        "_typeFilter": (
            "_typeFilter (the search parameters listed under each resource type; queries "
            "for a type are OR'd, their parameters AND'd)"
        ),
        "_elements": (
            "_elements (root elements, Type.element or element; resources marked SUBSETTED)"
        ),
    }
    listed = ", ".join(described.get(n, n) for n in names)
    return (
        f"Supported parameters: {listed}. The manifest gives count and fileSize for every "
        "file, and deleted[] (transaction Bundles) when _since is given. "
        "Prefer: handling=lenient and Prefer: separate-export-status are supported."
    )


def _operation(definition: str) -> dict[str, object]:
    return {"name": "export", "definition": definition, "documentation": export_parameters()}


def capability_statement(base: str, security: dict[str, object] | None = None) -> dict[str, object]:
    def resource(type_: str) -> dict[str, object]:
        entry: dict[str, object] = {
            "type": type_,
            "interaction": [],
            "searchParam": _search_params(type_),
        }
        if type_ == "Patient":
            entry["operation"] = [_operation(f"{BULK}/OperationDefinition/patient-export")]
        elif type_ == "Group":
            entry["operation"] = [_operation(f"{BULK}/OperationDefinition/group-export")]
        return entry

    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "kind": "instance",
        "instantiates": [f"{BULK}/CapabilityStatement/bulk-data"],
        "software": {"name": "exportsvc", "version": version("exportsvc")},
        "implementation": {"description": "exportsvc bulk data server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Every resource type listed can be exported; Patient- and Group-level "
                    f"exports cover the {len(PATIENT_COMPARTMENT)} types of the Patient "
                    "compartment."
                ),
                "resource": [resource(t) for t in sorted(RESOURCE_TYPES)],
                "operation": [_operation(f"{BULK}/OperationDefinition/export")],
                **({"security": security} if security else {}),
            }
        ],
    }


@routes.get("/metadata")
async def metadata(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(capability_statement(base_url(request), capability_security(request))),
        content_type="application/fhir+json",
    )
