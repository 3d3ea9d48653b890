"""Access tokens: the ones this service issues (HS256), and an external issuer's.

Both verifiers turn a bearer token into a :class:`Principal` (client id and scopes) or
raise :class:`~exportsvc.errors.Unauthorized` with a fixed reason that never quotes the
token. Library messages are not passed on: they are mapped to our own here.
"""

from __future__ import annotations

import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import exceptions as jwt_errors

from exportsvc.auth.jwks import ASYMMETRIC, JwksFetcher
from exportsvc.auth.scopes import parse_scopes
from exportsvc.errors import Unauthorized

CLOCK_SKEW_SECONDS = 30
MAX_TOKEN_CHARS = 16_384
MAX_CLIENT_ID_CHARS = 255
SERVICE_ISSUER = "urn:exportsvc"
SERVICE_AUDIENCE = "urn:exportsvc:bulk-data"
ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068: never mistaken for another JWT of the same key


@dataclass(frozen=True)
class Principal:
    client_id: str
    scopes: tuple[str, ...]


def rejected(exc: jwt_errors.PyJWTError) -> Unauthorized:
    """Our own reason for a library's rejection (its messages may quote token parts)."""
    reasons: list[tuple[type[jwt_errors.PyJWTError], str]] = [
        (jwt_errors.ExpiredSignatureError, "the token has expired"),
        (jwt_errors.ImmatureSignatureError, "the token is not valid yet"),
        (jwt_errors.InvalidAudienceError, "the token is for another audience (aud)"),
        (jwt_errors.InvalidIssuerError, "the token is from another issuer (iss)"),
        (jwt_errors.InvalidSubjectError, "the token's subject (sub) is wrong"),
        (jwt_errors.InvalidSignatureError, "the token's signature does not verify"),
        (jwt_errors.InvalidAlgorithmError, "the token's algorithm is not accepted"),
        (jwt_errors.InvalidKeyError, "the token's key does not fit its algorithm or is too short"),
    ]
    if isinstance(exc, jwt_errors.MissingRequiredClaimError):
        return Unauthorized(f"the token lacks the claim {exc.claim!r}")
    for kind, reason in reasons:
        if isinstance(exc, kind):
            return Unauthorized(reason)
    return Unauthorized("the token is malformed")


def unverified_header(token: str, algorithms: Iterable[str]) -> dict[str, Any]:
    """The header of a token not yet verified, its ``alg`` one of ``algorithms``."""
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized("the token is too long")
    try:
        header = jwt.get_unverified_header(token)
    except jwt_errors.PyJWTError as exc:
        raise rejected(exc) from exc
    if header.get("alg") not in set(algorithms):
        raise Unauthorized("the token's algorithm is not accepted")
    return header


def _client_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_CLIENT_ID_CHARS:
        raise Unauthorized("the token names no usable client id")
    return value


class TokenVerifier(ABC):
    async def verify(self, token: str) -> Principal:
        """The client a bearer token speaks for, or :class:`Unauthorized`."""
        try:
            return await self._verify(token)
        except jwt_errors.PyJWTError as exc:
            raise rejected(exc) from exc

    @abstractmethod
    async def _verify(self, token: str) -> Principal: ...


class ServiceTokens(TokenVerifier):
    """Access tokens this service issues at ``/auth/token``: JWTs signed HS256 with
    ``key`` (``EXPORTSVC_AUTH_TOKEN_KEY``, or random per process), carrying the client id
    (``sub`` and ``client_id``), the granted ``scope``, ``exp`` and a ``jti``."""

    ALGORITHM = "HS256"

    def __init__(
        self, key: bytes, *, lifetime: int = 300, clock: Callable[[], float] = time.time
    ) -> None:
        if len(key) < 32:
            raise ValueError("the access-token key must have at least 32 bytes")
        self._key, self.lifetime, self._clock = key, lifetime, clock

    def issue(self, client_id: str, scopes: Sequence[str]) -> str:
        now = int(self._clock())
        claims = {
            "iss": SERVICE_ISSUER,
            "aud": SERVICE_AUDIENCE,
            "sub": client_id,
            "client_id": client_id,
            "scope": " ".join(scopes),
            "iat": now,
            "exp": now + self.lifetime,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(
            claims, self._key, algorithm=self.ALGORITHM, headers={"typ": ACCESS_TOKEN_TYPE}
        )

    async def _verify(self, token: str) -> Principal:
        header = unverified_header(token, [self.ALGORITHM])
        if header.get("typ") != ACCESS_TOKEN_TYPE:
            raise Unauthorized("the token is not an access token of this service")
        claims = jwt.decode(
            token,
            self._key,
            algorithms=[self.ALGORITHM],
            audience=SERVICE_AUDIENCE,
            issuer=SERVICE_ISSUER,
            leeway=CLOCK_SKEW_SECONDS,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "scope"]},
        )
        scope = claims["scope"]
        if not isinstance(scope, str):
            raise Unauthorized("the token's scope is malformed")
        return Principal(_client_id(claims["sub"]), tuple(scope.split()))


class ExternalTokens(TokenVerifier):
    """Access tokens of an external issuer (Entra ID, Keycloak, ...): signed with a key
    of the issuer's JWKS (fetched from the configured URL only), ``iss`` and ``aud`` as
    configured, ``exp`` required and ``nbf`` honoured. The client is the first of ``azp``,
    ``appid``, ``client_id``, ``sub``; the scopes are ``scp``, ``roles`` and ``scope``
    together, of which only SMART system scopes count."""

    CLIENT_CLAIMS = ("azp", "appid", "client_id", "sub")

    def __init__(
        self, fetcher: JwksFetcher, *, jwks_url: str, issuer: str, audiences: Sequence[str]
    ) -> None:
        self._fetcher, self._jwks_url = fetcher, jwks_url
        self.issuer, self.audiences = issuer, list(audiences)

    async def _verify(self, token: str) -> Principal:
        header = unverified_header(token, ASYMMETRIC)
        alg = str(header["alg"])
        key = await self._fetcher.key(self._jwks_url, header.get("kid"), alg)
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=self.audiences,
            issuer=self.issuer,
            leeway=CLOCK_SKEW_SECONDS,
            options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
        )
        client = next((claims[c] for c in self.CLIENT_CLAIMS if claims.get(c)), None)
        return Principal(_client_id(client), external_scopes(claims))


def external_scopes(claims: dict[str, Any]) -> tuple[str, ...]:
    """SMART system scopes from ``scp`` (Entra delegated, a string), ``roles`` (Entra
    app roles, a list) and ``scope`` (RFC 9068: a string; some issuers: a list)."""
    texts: list[str] = []
    for claim in ("scp", "roles", "scope"):
        value = claims.get(claim)
        if isinstance(value, str):
            texts.extend(value.split())
        elif isinstance(value, list):
            texts.extend(v for v in value if isinstance(v, str))
    return tuple(s.text for s in parse_scopes(texts))
