"""Authorization for the app: ``setup_auth`` checks the settings, builds the state, mounts
the OAuth routes and opens the key-set fetcher in a cleanup context."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import web

from exportsvc.auth import oauth
from exportsvc.auth.assertion import ClientAssertions
from exportsvc.auth.jwks import JwksFetcher, check_jwks_url
from exportsvc.auth.middleware import AUTH, AuthState
from exportsvc.auth.replay import MemoryReplayCache
from exportsvc.auth.tokens import ExternalTokens, ServiceTokens
from exportsvc.settings import Settings

log = logging.getLogger(__name__)


class AuthConfigError(ValueError):
    """The authorization settings are incomplete or inconsistent."""


def setup_auth(app: web.Application, settings: Settings) -> None:
    """Authorization as ``settings.auth`` says; the app's middlewares must include
    :func:`~exportsvc.auth.middleware.auth_middleware` (after ``outcome_middleware``)."""
    app[AUTH] = build_auth(settings)
    if app[AUTH].mode == "smart":
        app.add_routes(oauth.routes)
    app.cleanup_ctx.append(_auth_context)


def build_auth(settings: Settings) -> AuthState:
    if settings.auth == "smart":
        return _smart(settings)
    if settings.auth == "external":
        return _external(settings)
    return AuthState("off", base_url=settings.base_url)


def _smart(settings: Settings) -> AuthState:
    if not settings.auth_clients:
        raise AuthConfigError(
            "EXPORTSVC_AUTH=smart needs clients in EXPORTSVC_AUTH_CLIENTS (a JSON list of "
            '{"client_id", "jwks" or "jwks_url", "scopes"}); EXPORTSVC_AUTH=off serves '
            "without authorization (local use only)"
        )
    try:
        fetcher = JwksFetcher(settings.auth_client_jwks_urls)
    except ValueError as exc:
        raise AuthConfigError(f"EXPORTSVC_AUTH_CLIENT_JWKS_URLS: {exc}") from exc
    for client in settings.auth_clients:
        if client.jwks_url is not None and client.jwks_url not in fetcher.allowed:
            raise AuthConfigError(
                f"client {client.client_id!r}: its jwks_url is not listed in "
                "EXPORTSVC_AUTH_CLIENT_JWKS_URLS"
            )
    key = settings.auth_token_key
    try:
        tokens = ServiceTokens(
            key.get_secret_value().encode() if key else secrets.token_bytes(32),
            lifetime=settings.auth_token_seconds,
        )
    except ValueError as exc:
        raise AuthConfigError(f"EXPORTSVC_AUTH_TOKEN_KEY: {exc}") from exc
    replay = MemoryReplayCache(settings.auth_replay_cache_size)
    return AuthState(
        "smart",
        base_url=settings.base_url,
        verifier=tokens,
        tokens=tokens,
        assertions=ClientAssertions(settings.auth_clients, fetcher, replay),
        fetcher=fetcher,
        startup={
            "clients": len(settings.auth_clients),
            "token_key": "configured" if key else "random per process",
        },
    )


def _external(settings: Settings) -> AuthState:
    issuer, audiences, url = (
        settings.auth_issuer,
        settings.auth_audience,
        settings.auth_issuer_jwks_url,
    )
    if not (issuer and audiences and url):
        raise AuthConfigError(
            "EXPORTSVC_AUTH=external needs EXPORTSVC_AUTH_ISSUER, EXPORTSVC_AUTH_AUDIENCE "
            "(a JSON list) and EXPORTSVC_AUTH_ISSUER_JWKS_URL"
        )
    try:
        fetcher = JwksFetcher([check_jwks_url(url)])
    except ValueError as exc:
        raise AuthConfigError(f"EXPORTSVC_AUTH_ISSUER_JWKS_URL: {exc}") from exc
    verifier = ExternalTokens(fetcher, jwks_url=url, issuer=issuer, audiences=audiences)
    return AuthState(
        "external",
        base_url=settings.base_url,
        verifier=verifier,
        fetcher=fetcher,
        issuer=issuer,
        startup={"issuer": issuer},
    )


async def _auth_context(app: web.Application) -> AsyncIterator[None]:
    auth = app[AUTH]
    if auth.mode == "off":
        log.warning("auth.off", extra={"detail": "no authorization: every caller is anonymous"})
    else:
        log.info(f"auth.{auth.mode}", extra=auth.startup)
    if auth.fetcher is not None:
        await auth.fetcher.open()
    try:
        yield
    finally:
        if auth.fetcher is not None:
            await auth.fetcher.close()
