"""JSON Web Key Sets: the rules for a public key set, choosing the key that verifies a
token, and fetching sets from the URLs the configuration allows (and no others).

A token's own header never says where to fetch keys: a ``jku`` is at most compared with
the URL already registered (see :mod:`exportsvc.auth.assertion`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from jwt import PyJWK, PyJWKError

from exportsvc.errors import KeysUnavailable, Unauthorized

log = logging.getLogger(__name__)

# alg -> (kty, crv): the only signature algorithms accepted anywhere; no HS*, no "none".
ASYMMETRIC = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}
MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 100


def check_jwks_url(url: str) -> str:
    """``url`` if it may serve keys: ``https``, or ``http`` to a loopback address only."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and _loopback(parts.hostname or ""):
        return url
    raise ValueError(f"a JWKS URL must be https (http only on loopback): {url[:200]!r}")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_keys(document: object) -> list[dict[str, Any]]:
    """The keys of a JWK Set, checked: public, asymmetric, at most :data:`MAX_KEYS`."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys or len(keys) > MAX_KEYS:
        raise ValueError(f'a JWK Set is an object {{"keys": [...]}} of 1 to {MAX_KEYS} keys')
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") not in ("RSA", "EC"):
            raise ValueError("every key of a JWK Set must be an RSA or EC key (kty)")
        if any(private in key for private in ("d", "p", "q", "dp", "dq", "qi")):
            raise ValueError("a JWK Set holds a private key: register the public key only")
    return keys


def select_key(keys: Iterable[dict[str, Any]], kid: object, alg: str) -> PyJWK:
    """The key that can verify a token of ``kid`` and ``alg``: of the algorithm's key type
    (so an RSA key never meets an HMAC algorithm), meant for signatures, ``kid`` equal.
    Without ``kid`` the set must hold exactly one such key."""
    kty, crv = ASYMMETRIC[alg]
    candidates = [
        key
        for key in keys
        if key.get("kty") == kty
        and (crv is None or key.get("crv") == crv)
        and key.get("use", "sig") == "sig"
        and key.get("alg", alg) == alg
        and "verify" in key.get("key_ops", ["verify"])
        and (kid is None or key.get("kid") == kid)
    ]
    if not candidates:
        raise Unauthorized("no key of the key set matches the token's kid and alg")
    if len(candidates) > 1:
        raise Unauthorized("several keys match the token: it must name its key (kid)")
    try:
        return PyJWK(candidates[0], algorithm=alg)
    except PyJWKError as exc:
        raise Unauthorized("the matching key of the key set is unusable") from exc


@dataclass
class _Cached:
    keys: list[dict[str, Any]]
    fetched: float


class JwksFetcher:
    """Key sets fetched over HTTP from allowed URLs only, cached ``ttl`` seconds; a token
    naming an unknown ``kid`` (the issuer rotated its keys) fetches again, at most every
    ``min_refresh`` seconds. One session per process: :meth:`open` and :meth:`close`."""

    def __init__(
        self,
        allowed: Iterable[str],
        *,
        ttl: float = 300.0,
        min_refresh: float = 30.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed = frozenset(check_jwks_url(url) for url in allowed)
        self._ttl, self._min_refresh, self._clock = ttl, min_refresh, clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._cache: dict[str, _Cached] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def key(self, url: str, kid: object, alg: str) -> PyJWK:
        keys = await self._keys(url, refresh=False)
        try:
            return select_key(keys, kid, alg)
        except Unauthorized:
            fresh = await self._keys(url, refresh=True)
            if fresh is keys:
                raise
            return select_key(fresh, kid, alg)

    async def _keys(self, url: str, *, refresh: bool) -> list[dict[str, Any]]:
        if url not in self.allowed:
            raise Unauthorized("the token's key set is not at an allowed URL")
        async with self._locks.setdefault(url, asyncio.Lock()):
            cached, now = self._cache.get(url), self._clock()
            if cached is not None and now - cached.fetched < (
                self._min_refresh if refresh else self._ttl
            ):
                return cached.keys
            try:
                keys = await self._fetch(url)
            except KeysUnavailable:
                if cached is None:
                    raise
                # Keep serving the keys we have; try again after min_refresh.
                cached.fetched = now - self._ttl + self._min_refresh
                return cached.keys
            self._cache[url] = _Cached(keys, now)
            return keys

    async def _fetch(self, url: str) -> list[dict[str, Any]]:
        if self._session is None:
            raise RuntimeError("JwksFetcher.open() was not called")
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
                keys = public_keys(orjson.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("auth.jwks_failed", extra={"url": url, "error": str(exc)[:200]})
            raise KeysUnavailable(headers={"Retry-After": "30"}) from exc
        log.info("auth.jwks_fetched", extra={"url": url, "keys": len(keys)})
        return keys
