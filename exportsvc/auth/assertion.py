"""SMART Backend Services client authentication: the signed client assertion.

A client proves who it is with a JWT signed by its private key (RS384 or ES384), per
https://hl7.org/fhir/smart-app-launch/backend-services.html and RFC 7523:
``iss`` = ``sub`` = its client id, ``aud`` = this service's token URL, ``exp`` at most
five minutes ahead, and a ``jti`` used once. Nothing in the assertion decides where keys
come from: a ``jku`` header must equal the client's registered (allowlisted) ``jwks_url``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import jwt
from jwt import exceptions as jwt_errors

from exportsvc.auth.clients import ClientRegistration
from exportsvc.auth.jwks import JwksFetcher, select_key
from exportsvc.auth.replay import ReplayCache
from exportsvc.auth.tokens import CLOCK_SKEW_SECONDS, rejected, unverified_header
from exportsvc.errors import Unauthorized

ASSERTION_ALGORITHMS = ("RS384", "ES384")
MAX_LIFETIME_SECONDS = 300
MAX_JTI_CHARS = 255


class ClientAssertions:
    def __init__(
        self,
        clients: Iterable[ClientRegistration],
        fetcher: JwksFetcher,
        replay: ReplayCache,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clients = {c.client_id: c for c in clients}
        self._fetcher, self._clock = fetcher, clock
        self.replay = replay
        """Where used jti values are claimed (the service swaps in the store's once open)."""

    async def authenticate(self, assertion: str, token_url: str) -> ClientRegistration:
        """The client that signed ``assertion`` for ``token_url``, or :class:`Unauthorized`.
        The ``jti`` is claimed last, so only a fully valid assertion can use one up."""
        header = unverified_header(assertion, ASSERTION_ALGORITHMS)
        alg = str(header["alg"])
        client = self._claimed_client(assertion)
        jku = header.get("jku")
        if jku is not None and (client.jwks_url is None or jku != client.jwks_url):
            raise Unauthorized("the assertion's jku is not the client's registered JWKS URL")
        if client.jwks is not None:
            key = select_key(client.jwks["keys"], header.get("kid"), alg)
        else:
            assert client.jwks_url is not None
            key = await self._fetcher.key(client.jwks_url, header.get("kid"), alg)
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=[alg],
                audience=token_url,
                issuer=client.client_id,
                subject=client.client_id,
                leeway=CLOCK_SKEW_SECONDS,
                options={
                    "require": ["iss", "sub", "aud", "exp", "jti"],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt_errors.PyJWTError as exc:
            raise rejected(exc) from exc
        await self._use_once(client, claims)
        return client

    def _claimed_client(self, assertion: str) -> ClientRegistration:
        """The registered client the assertion claims to be (checked by its signature next)."""
        try:
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt_errors.PyJWTError as exc:
            raise rejected(exc) from exc
        iss, sub = claims.get("iss"), claims.get("sub")
        if not isinstance(iss, str) or iss != sub:
            raise Unauthorized("the assertion's iss and sub must both be the client id")
        client = self.clients.get(iss)
        if client is None:
            raise Unauthorized("the assertion names no registered client")
        return client

    async def _use_once(self, client: ClientRegistration, claims: dict[str, Any]) -> None:
        exp, jti = claims["exp"], claims["jti"]
        now = self._clock()
        if (
            not isinstance(exp, int | float)
            or exp > now + MAX_LIFETIME_SECONDS + CLOCK_SKEW_SECONDS
        ):
            raise Unauthorized("the assertion's exp is more than five minutes ahead")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise Unauthorized("the assertion's jti is malformed")
        # The key is a digest: any client id and jti make a fixed-length key without NUL
        # (which a PostgreSQL text column refuses).
        key = hashlib.sha256(f"{client.client_id}\x00{jti}".encode()).hexdigest()
        if not await self.replay.claim(key, exp + CLOCK_SKEW_SECONDS):
            raise Unauthorized("the assertion's jti was already used")
