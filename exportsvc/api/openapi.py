"""``GET /openapi.json``: an OpenAPI 3.0 description of the HTTP API.

Built here rather than kept as a file so that it follows the deployment: its server URL
is the service's base URL, and the OAuth routes and the bearer security scheme appear
only with ``EXPORTSVC_AUTH=smart`` (``external``: the scheme only). The test suite runs
schemathesis over it against a live server: no answer may be a 5xx, and every 4xx is a
FHIR OperationOutcome (the token endpoint's are OAuth errors, as RFC 6749 says).
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from aiohttp import web

from exportsvc.api.keys import base_url
from exportsvc.auth.middleware import AUTH, SMART_CONFIGURATION_PATH, TOKEN_PATH

routes = web.RouteTableDef()
OPENAPI_PATH = "/openapi.json"
FHIR_JSON = "application/fhir+json"
NDJSON = "application/fhir+ndjson"

OUTCOME = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {
                        "type": "string",
                        "enum": ["fatal", "error", "warning", "information"],
                    },
                    "code": {"type": "string"},
                    "diagnostics": {"type": "string"},
                },
            },
        },
    },
}
PARAMETERS = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["Parameters"]},
        "parameter": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "valueString": {"type": "string"},
                    "valueCode": {"type": "string"},
                    "valueUri": {"type": "string"},
                    "valueInstant": {"type": "string"},
                    "valueReference": {
                        "type": "object",
                        "properties": {"reference": {"type": "string"}},
                    },
                    "part": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
    },
}
IMPORT_MANIFEST = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "inputFormat": {"type": "string"},
        "mode": {"type": "string", "enum": ["IncrementalLoad", "InitialLoad"]},
        "input": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["url"],
                "properties": {
                    "type": {"type": "string"},
                    "url": {"type": "string"},
                    "etag": {"type": "string"},
                },
            },
        },
    },
}
MANIFEST = {
    "type": "object",
    "required": ["transactionTime", "request", "requiresAccessToken", "output", "error"],
    "properties": {
        "transactionTime": {"type": "string"},
        "request": {"type": "string"},
        "requiresAccessToken": {"type": "boolean"},
        "output": {"type": "array", "items": {"type": "object"}},
        "error": {"type": "array", "items": {"type": "object"}},
    },
}
OBJECT = {"type": "object"}


def _outcome(description: str, **headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {FHIR_JSON: {"schema": OUTCOME}},
    }
    if headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return answer


def _json(description: str, schema: dict[str, Any], media: str = "application/json") -> Any:
    return {"description": description, "content": {media: {"schema": schema}}}


ERRORS = {
    "400": _outcome("invalid request: the OperationOutcome names the problem"),
    "401": _outcome("no or a rejected access token", **{"WWW-Authenticate": "Bearer"}),
    "403": _outcome("the token's scopes do not allow it"),
    "404": _outcome("no such route, job, group or file (or not this client's)"),
    "405": _outcome("method not allowed", Allow="the allowed methods"),
    "409": _outcome("the job's state does not allow it"),
    "413": _outcome("the body is larger than EXPORTSVC_MAX_BODY_BYTES"),
    "414": _outcome("the URL is longer than EXPORTSVC_MAX_URL_BYTES"),
    "431": _outcome("a header is larger than EXPORTSVC_MAX_HEADER_BYTES, or too many"),
}


def _answers(*codes: str, **more: Any) -> dict[str, Any]:
    return {**{code: ERRORS[code] for code in codes}, **more}


def _query(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": description,
        "schema": {"type": "string", **schema},
    }


PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": True,
    "description": "respond-async (required); handling=lenient ignores unknown parameters",
    "schema": {
        "type": "string",
        "enum": [
            "respond-async",
            "respond-async, handling=lenient",
            "respond-async, separate-export-status",
        ],
    },
}
JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
EXPORT_QUERY = [
    _query("_type", "comma-separated resource types"),
    _query("_since", "FHIR instant: resources changed after it", format="date-time"),
    _query("_until", "FHIR instant: resources changed up to it", format="date-time"),
    _query("_outputFormat", "application/fhir+ndjson (the default)"),
    _query("_container", "Azure container for the files (3-63 of a-z 0-9 -)"),
    _query("_typeFilter", "Type?param=value&... (the search parameters in GET /metadata)"),
    _query("_elements", "comma-separated elements: element or Type.element"),
    _query("includeAssociatedData", "LatestProvenanceResources, RelevantProvenanceResources"),
    _query("organizeOutputBy", "Patient"),
    _query("allowPartialManifests", "true or false"),
]
ACCEPTED = _outcome(
    "accepted: poll the status URL", **{"Content-Location": "the status URL (absolute)"}
)


def _kickoff(summary: str, path_parameters: list[dict[str, Any]]) -> dict[str, Any]:
    answers = _answers(
        "400",
        "401",
        "403",
        "404",
        "413",
        "414",
        "431",
        **{"202": ACCEPTED, "429": _outcome("too many active jobs", **{"Retry-After": "s"})},
    )
    return {
        "get": {
            "summary": summary,
            "parameters": [*path_parameters, PREFER, *EXPORT_QUERY],
            "responses": answers,
        },
        "post": {
            "summary": summary + " (a Parameters body; patient only here)",
            "parameters": [*path_parameters, PREFER],
            "requestBody": {"required": True, "content": {FHIR_JSON: {"schema": PARAMETERS}}},
            "responses": answers,
        },
    }


def _status(kind: str, done: dict[str, Any], delete_codes: tuple[str, ...]) -> dict[str, Any]:
    running = {
        "description": "queued or running",
        "headers": {
            "X-Progress": {"schema": {"type": "string"}},
            "Retry-After": {"schema": {"type": "string"}},
        },
    }
    return {
        "parameters": [JOB_ID],
        "get": {
            "summary": f"{kind} status: 202 while running, 200 with the manifest when done",
            "responses": _answers("401", "404", **{"200": done, "202": running}),
        },
        "delete": {
            "summary": f"cancel the {kind}",
            "responses": _answers("401", "404", *delete_codes, **{"202": _outcome("cancelled")}),
        },
    }


def _admin(summary: str, ok: str = "200", method: str = "get") -> dict[str, Any]:
    return {
        method: {
            "summary": summary,
            "responses": _answers("403", "404", **{ok: _json(summary, OBJECT)}),
        }
    }


def openapi_document(base: str, auth: str) -> dict[str, Any]:
    group_id = {
        "name": "group_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9.-]{1,64}$"},
    }
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    retry = _admin("retry a failed job from its checkpoint", "202", "post")
    retry["post"]["responses"]["409"] = _outcome("the job has not failed")
    pause = _admin("pause at the next page", "202", "post")
    pause["post"]["responses"]["409"] = _outcome("nothing to pause or resume")
    resume = _admin("let a paused job run again", "202", "post")
    resume["post"]["responses"]["409"] = _outcome("nothing to pause or resume")
    import_done = _json("done: the import manifest", MANIFEST)
    paths: dict[str, Any] = {
        "/$export": _kickoff("system-level export", []),
        "/Patient/$export": _kickoff("Patient-level export", []),
        "/Group/{group_id}/$export": _kickoff("Group-level export", [group_id]),
        "/_operations/export/{job_id}": _status("export", _json("done", MANIFEST), ()),
        "/_operations/export/{job_id}/page/{page}": {
            "get": {
                "summary": "page k >= 1 of an allowPartialManifests export's manifest",
                "parameters": [
                    JOB_ID,
                    {"name": "page", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                "responses": _answers("401", "404", **{"200": _json("the page", MANIFEST)}),
            }
        },
        "/_output/{job_id}/{name}": {
            "get": {
                "summary": "a file of a finished export or import (error file)",
                "parameters": [JOB_ID, name],
                "responses": _answers(
                    "401", "404", **{"200": {"description": "ndjson", "content": {NDJSON: {}}}}
                ),
            }
        },
        "/$import": {
            "post": {
                "summary": "bulk import: a Parameters body or the JSON manifest form",
                "parameters": [PREFER],
                "requestBody": {
                    "required": True,
                    "content": {
                        FHIR_JSON: {"schema": {"oneOf": [PARAMETERS, IMPORT_MANIFEST]}},
                        "application/json": {"schema": IMPORT_MANIFEST},
                    },
                },
                "responses": _answers(
                    "400", "401", "403", "413", "414", "431", **{"202": ACCEPTED}
                ),
            }
        },
        "/_operations/import/{job_id}": _status("import", import_done, ("409",)),
        "/metadata": {
            "get": {
                "summary": "the CapabilityStatement",
                "responses": {"200": _json("CapabilityStatement", OBJECT, FHIR_JSON)},
            }
        },
        OPENAPI_PATH: {
            "get": {"summary": "this document", "responses": {"200": _json("OpenAPI", OBJECT)}}
        },
        "/_admin/health": {
            "get": {"summary": "liveness", "responses": {"200": _json("health", OBJECT)}}
        },
        "/_admin/jobs": {
            "get": {
                "summary": "every client's jobs",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    }
                ],
                "responses": _answers("400", "403", **{"200": _json("jobs", OBJECT)}),
            }
        },
        "/_admin/jobs/{job_id}": {"parameters": [JOB_ID], **_admin("one job")},
        "/_admin/jobs/{job_id}/pause": {"parameters": [JOB_ID], **pause},
        "/_admin/jobs/{job_id}/resume": {"parameters": [JOB_ID], **resume},
        "/_admin/jobs/{job_id}/retry": {"parameters": [JOB_ID], **retry},
        "/_admin/workload": _admin("queued and running work, for an autoscaler"),
        "/_admin/drain": _admin("drain like SIGTERM: the server exits", "202", "post"),
    }
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "exportsvc: FHIR Bulk Data $export / $import",
            "version": version("exportsvc"),
            "description": (
                "Every error is a FHIR OperationOutcome naming the problem. /_admin answers "
                "EXPORTSVC_ADMIN_TOKEN as a bearer token, or loopback clients without one."
            ),
        },
        "servers": [{"url": base}],
        "paths": paths,
    }
    if auth != "off":
        document["components"] = {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        }
        public = {"/metadata", OPENAPI_PATH, "/_admin/health"}
        for path, item in paths.items():
            if path not in public and not path.startswith("/_admin/"):
                for operation in item.values():
                    if isinstance(operation, dict) and "responses" in operation:
                        operation["security"] = [{"bearer": []}]
    if auth == "smart":
        paths[SMART_CONFIGURATION_PATH] = {
            "get": {
                "summary": "SMART configuration",
                "responses": {"200": _json("SMART configuration", OBJECT)},
            }
        }
        oauth_error = _json(
            "an OAuth error (RFC 6749), not an OperationOutcome",
            {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        )
        paths[TOKEN_PATH] = {
            "post": {
                "summary": "SMART Backend Services: an access token for a client assertion",
                "requestBody": {
                    "required": True,
                    "content": {"application/x-www-form-urlencoded": {"schema": OBJECT}},
                },
                "responses": {
                    "200": _json("an access token", OBJECT),
                    "400": oauth_error,
                    "401": oauth_error,
                    "413": ERRORS["413"],
                    "503": oauth_error,
                },
            }
        }
    return document


@routes.get(OPENAPI_PATH)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(base_url(request), request.app[AUTH].mode))
