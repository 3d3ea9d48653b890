"""``GET /metadata``: the CapabilityStatement real clients read before an export."""

from __future__ import annotations

from importlib.metadata import version

import orjson
from aiohttp import web

from exportsvc.api.keys import base_url
from exportsvc.auth.oauth import capability_security
from exportsvc.fhir.compartment import PATIENT_COMPARTMENT, RESOURCE_TYPES

routes = web.RouteTableDef()
BULK = "http://hl7.org/fhir/uv/bulkdata"


def capability_statement(base: str, security: dict[str, object] | None = None) -> dict[str, object]:
    def resource(type_: str) -> dict[str, object]:
        entry: dict[str, object] = {"type": type_, "interaction": []}
        if type_ == "Patient":
            entry["operation"] = [
                {"name": "export", "definition": f"{BULK}/OperationDefinition/patient-export"}
            ]
        elif type_ == "Group":
            entry["operation"] = [
                {"name": "export", "definition": f"{BULK}/OperationDefinition/group-export"}
            ]
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
                "operation": [
                    {"name": "export", "definition": f"{BULK}/OperationDefinition/export"},
                ],
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
