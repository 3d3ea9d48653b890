"""The bearer-token gate in front of every route, and the scope checks handlers call.

With authorization on, a request to any route but the public ones needs
``Authorization: Bearer <token>``; a missing or rejected token is a ``401``
OperationOutcome with ``WWW-Authenticate: Bearer``. A verified token sets
``request[CLIENT]`` (who owns and sees jobs: ``exportsvc.api.keys.client_of``) and
``request[SCOPES]`` (what :func:`check_export_types` and :func:`check_import_types` allow).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from exportsvc.auth.assertion import ClientAssertions
from exportsvc.auth.jwks import JwksFetcher
from exportsvc.auth.scopes import READ, WRITE, permitted_types
from exportsvc.auth.tokens import ServiceTokens, TokenVerifier
from exportsvc.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

AuthMode = Literal["off", "smart", "external"]
TOKEN_PATH = "/auth/token"
SMART_CONFIGURATION_PATH = "/.well-known/smart-configuration"
PUBLIC_PATHS = frozenset(
    {"/metadata", "/openapi.json", SMART_CONFIGURATION_PATH, TOKEN_PATH, "/_admin/health"}
)
ADMIN_PREFIX = "/_admin/"
"""``/_admin`` has its own gate (``EXPORTSVC_ADMIN_TOKEN`` in the same header, or loopback)."""
INVALID_TOKEN = 'Bearer error="invalid_token"'
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class AuthState:
    """What the middleware and the token endpoint need; built by ``setup_auth``."""

    mode: AuthMode
    base_url: str | None = None
    """``EXPORTSVC_BASE_URL``: the token URL is built on it (else on the request's host)."""
    verifier: TokenVerifier | None = None
    tokens: ServiceTokens | None = None
    """smart: issues (and, as ``verifier``, verifies) this service's access tokens."""
    assertions: ClientAssertions | None = None
    fetcher: JwksFetcher | None = None
    issuer: str | None = None
    """external: the issuer, for the CapabilityStatement."""
    startup: dict[str, object] = field(default_factory=dict)
    """What the startup log line reports."""


AUTH = web.AppKey("auth", AuthState)
CLIENT = web.RequestKey("client", str)
SCOPES = web.RequestKey("scopes", tuple[str, ...])


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    auth = request.app[AUTH]  # no setup_auth: a KeyError, a 500, never an open door
    if auth.mode == "off" or _public(request.path):
        return await handler(request)
    assert auth.verifier is not None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized()
    try:
        principal = await auth.verifier.verify(token)
    except Unauthorized as exc:
        log.info("auth.token_rejected", extra={"path": request.path, "reason": exc.message})
        raise Unauthorized(
            f"the access token was rejected: {exc.message}",
            headers={"WWW-Authenticate": INVALID_TOKEN},
        ) from exc
    request[CLIENT] = principal.client_id
    request[SCOPES] = principal.scopes
    return await handler(request)


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(ADMIN_PREFIX)


def check_export_types(request: web.Request, types: Sequence[str]) -> frozenset[str] | None:
    """Raise ``403`` when the token may not read every one of ``types`` (``_type``).

    Returns the types the token may read, ``None`` meaning all of them (and always with
    authorization off). An export without ``_type`` means every type: when this is not
    ``None``, restrict the export to these types."""
    permitted = _permitted(request, READ)
    if permitted is None:
        return None
    if not permitted:
        raise _insufficient("the access token grants reading no resource type", "system/*.rs")
    if outside := [t for t in types if t not in permitted]:
        raise _insufficient(
            f"the access token does not grant reading {', '.join(outside)}",
            " ".join(f"system/{t}.rs" for t in outside),
        )
    return permitted


def check_import_types(request: web.Request, types: Sequence[str | None]) -> None:
    """Raise ``403`` unless the token may write (create and update) each input's type;
    an input of no declared type may hold any type, so it needs ``system/*.write``."""
    permitted = _permitted(request, WRITE)
    if permitted is None:
        return
    if None in types:
        raise _insufficient(
            "an input without a type needs a token granting writes to every type",
            "system/*.cu",
        )
    if outside := sorted({t for t in types if t is not None and t not in permitted}):
        raise _insufficient(
            f"the access token does not grant writing {', '.join(outside)}",
            " ".join(f"system/{t}.cu" for t in outside),
        )


def _permitted(request: web.Request, needed: frozenset[str]) -> frozenset[str] | None:
    if request.app[AUTH].mode == "off":
        return None
    scopes = request.get(SCOPES)
    if scopes is None:  # an authenticated route always has them: refuse, never allow
        raise Unauthorized()
    return permitted_types(scopes, needed)


def _insufficient(message: str, scope: str) -> Forbidden:
    return Forbidden(
        message, headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'}
    )
