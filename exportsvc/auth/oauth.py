"""The OAuth side: ``POST /auth/token`` (client credentials with a signed assertion),
``/.well-known/smart-configuration``, and the CapabilityStatement's ``rest.security``.

The token endpoint speaks OAuth, not FHIR: its errors are RFC 6749 JSON
(``{"error", "error_description"}``), ``400``, or ``401`` for ``invalid_client``.
"""

from __future__ import annotations

import logging

from aiohttp import web

from exportsvc.auth.assertion import ASSERTION_ALGORITHMS
from exportsvc.auth.middleware import AUTH, SMART_CONFIGURATION_PATH, TOKEN_PATH, AuthState
from exportsvc.auth.replay import ReplayCacheFull
from exportsvc.auth.scopes import SCOPES_SUPPORTED, grant
from exportsvc.errors import KeysUnavailable, Unauthorized

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
SMART_SECURITY = "http://terminology.hl7.org/CodeSystem/restful-security-service"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


class OAuthError(Exception):
    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


def token_url(request: web.Request) -> str:
    """The absolute token URL: the ``aud`` every client assertion must name. On
    ``EXPORTSVC_BASE_URL`` when set (behind a proxy it must be), else the request's."""
    configured = request.app[AUTH].base_url
    base = configured.rstrip("/") if configured else f"{request.scheme}://{request.host}"
    return base + TOKEN_PATH


@routes.post(TOKEN_PATH)
async def token(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    try:
        client_id, scopes = await _grant(request, auth)
    except OAuthError as exc:
        log.info(
            "auth.token_refused",
            extra={"error": exc.error, "reason": exc.description, "remote": request.remote},
        )
        headers = NO_STORE | ({"Retry-After": "5"} if exc.status == 503 else {})
        return web.json_response(
            {"error": exc.error, "error_description": exc.description},
            status=exc.status,
            headers=headers,
        )
    assert auth.tokens is not None
    granted = " ".join(scopes)
    log.info(
        "auth.token_issued",
        extra={"client": client_id, "scopes": len(scopes), "scope": granted[:300]},
    )
    return web.json_response(
        {
            "access_token": auth.tokens.issue(client_id, scopes),
            "token_type": "bearer",
            "expires_in": auth.tokens.lifetime,
            "scope": granted,
        },
        headers=NO_STORE,
    )


async def _grant(request: web.Request, auth: AuthState) -> tuple[str, list[str]]:
    """(client id, granted scopes) for a valid token request, else :class:`OAuthError`."""
    assert auth.assertions is not None
    form = await _form(request)
    if form.get("grant_type") != "client_credentials":
        raise OAuthError("unsupported_grant_type", "grant_type must be client_credentials")
    if "client_assertion" not in form or "client_assertion_type" not in form:
        raise OAuthError("invalid_request", "client_assertion and its type are required")
    if form["client_assertion_type"] != JWT_BEARER:
        raise OAuthError(
            "invalid_client", f"client_assertion_type must be {JWT_BEARER}", status=401
        )
    try:
        client = await auth.assertions.authenticate(form["client_assertion"], token_url(request))
    except Unauthorized as exc:
        raise OAuthError("invalid_client", exc.message, status=401) from exc
    except (KeysUnavailable, ReplayCacheFull) as exc:
        raise OAuthError("temporarily_unavailable", exc.message, status=503) from exc
    if form.get("client_id", client.client_id) != client.client_id:
        raise OAuthError("invalid_client", "client_id is not the assertion's", status=401)
    if not form.get("scope", "").strip():
        raise OAuthError("invalid_scope", "scope is required, e.g. system/*.rs")
    granted = grant(form["scope"], client.scopes)
    if not granted:
        raise OAuthError("invalid_scope", "none of the requested scopes is allowed this client")
    return client.client_id, granted


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "send the form as application/x-www-form-urlencoded")
    form: dict[str, str] = {}
    for name, value in (await request.post()).items():
        if name in form or not isinstance(value, str):
            raise OAuthError("invalid_request", f"parameter {name[:64]!r} is repeated or a file")
        form[name] = value
    return form


@routes.get(SMART_CONFIGURATION_PATH)
async def smart_configuration(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "token_endpoint": token_url(request),
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": list(SCOPES_SUPPORTED),
            "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        }
    )


def capability_security(request: web.Request) -> dict[str, object] | None:
    """``CapabilityStatement.rest[0].security``: ``None`` with authorization off."""
    auth = request.app[AUTH]
    if auth.mode == "smart":
        return {
            "extension": [
                {
                    "url": OAUTH_URIS,
                    "extension": [{"url": "token", "valueUri": token_url(request)}],
                }
            ],
            "service": [
                {
                    "coding": [
                        {
                            "system": SMART_SECURITY,
                            "code": "SMART-on-FHIR",
                            "display": "SMART-on-FHIR",
                        }
                    ],
                    "text": "SMART Backend Services (client-confidential-asymmetric)",
                }
            ],
            "description": (
                "Bearer access tokens from the token endpoint, requested with a client "
                "assertion signed RS384 or ES384 by a registered client; system scopes "
                "(system/*.rs, system/<Type>.rs; v1 .read) limit the types exported."
            ),
        }
    if auth.mode == "external":
        return {
            "service": [
                {"coding": [{"system": SMART_SECURITY, "code": "OAuth", "display": "OAuth"}]}
            ],
            "description": f"Bearer access tokens issued by {auth.issuer}; SMART system scopes.",
        }
    return None
