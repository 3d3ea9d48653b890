"""FHIR OperationOutcome responses, and the one middleware that produces them for errors."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from exportsvc.errors import ExportSvcError

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"

_HTTP_CODES = {404: "not-found", 405: "not-supported", 413: "too-long", 429: "throttled"}


def operation_outcome(
    message: str, *, code: str = "exception", severity: str = "error"
) -> dict[str, object]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": message}],
    }


def outcome_response(
    status: int,
    message: str,
    *,
    code: str = "exception",
    severity: str = "error",
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(operation_outcome(message, code=code, severity=severity)),
        content_type=FHIR_JSON,
        headers=headers,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def outcome_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ExportSvcError as exc:
        if exc.status >= 500:
            log.error("http.error", extra={"path": request.path, "error": exc.message})
        return outcome_response(exc.status, exc.message, code=exc.code, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        message = exc.reason
        if isinstance(exc, web.HTTPRequestEntityTooLarge):  # names the limit and the size
            message = f"the request body is too large: {exc.text} (EXPORTSVC_MAX_BODY_BYTES)"
        return outcome_response(
            exc.status, message, code=_HTTP_CODES.get(exc.status, "invalid"), headers=headers
        )
    except Exception:
        log.exception("http.unhandled", extra={"path": request.path})
        return outcome_response(500, "internal server error")
