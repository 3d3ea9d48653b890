"""Authorization without a server: scopes, client registrations, the replay cache, this
service's access tokens, and client assertions — hostile ones above all, one per test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import ValidationError

from exportsvc.auth.assertion import ClientAssertions
from exportsvc.auth.clients import ClientRegistration
from exportsvc.auth.jwks import JwksFetcher, select_key
from exportsvc.auth.middleware import (
    AUTH,
    SCOPES,
    AuthState,
    check_export_types,
    check_import_types,
)
from exportsvc.auth.replay import MemoryReplayCache, ReplayCacheFull
from exportsvc.auth.scopes import grant, parse_scope, permitted_types
from exportsvc.auth.tokens import ServiceTokens, external_scopes
from exportsvc.errors import Forbidden, Unauthorized

TOKEN_URL = "https://bulk.example.org/auth/token"
CLIENT = "client-1"
JWKS_URL = "https://keys.example.org/client-1/jwks.json"


# -- keys and tokens -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": CLIENT,
        "sub": CLIENT,
        "aud": TOKEN_URL,
        "exp": now + 240,
        "jti": uuid.uuid4().hex,
    }
    return {k: v for k, v in (base | overrides).items() if v is not None}


def sign(key: Any, body: dict[str, Any], alg: str = "RS384", **header: Any) -> str:
    return jwt.encode(body, key, algorithm=alg, headers={"kid": "k1", **header})


@pytest.fixture
def registration(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> ClientRegistration:
    jwks = {"keys": [public_jwk(rsa_key, "k1"), public_jwk(ec_key, "k2")]}
    return ClientRegistration(client_id=CLIENT, jwks=jwks, scopes=["system/*.rs"])


@pytest.fixture
def assertions(registration: ClientRegistration) -> ClientAssertions:
    return ClientAssertions([registration], JwksFetcher([]), MemoryReplayCache(1000))


async def refused(assertions: ClientAssertions, token: str, reason: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        await assertions.authenticate(token, TOKEN_URL)
    assert reason in caught.value.message
    assert token not in caught.value.message


# -- scopes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "resource", "permissions"),
    [
        ("system/*.read", "*", "rs"),
        ("system/*.rs", "*", "rs"),
        ("system/Patient.read", "Patient", "rs"),
        ("system/Observation.rs", "Observation", "rs"),
        ("system/*.write", "*", "cud"),
        ("system/*.cruds", "*", "cruds"),
        ("system/Patient.*", "Patient", "cruds"),
    ],
)
def test_parse_scope(text: str, resource: str, permissions: str) -> None:
    scope = parse_scope(text)
    assert scope is not None and scope.resource == resource
    assert scope.permissions == frozenset(permissions)


@pytest.mark.parametrize(
    "text",
    [
        "patient/*.read",
        "user/Patient.rs",
        "system/Nope.rs",
        "system/*.sr",  # v2 permissions come in the order c r u d s
        "system/*.rr",
        "system/*.",
        "system/*",
        "system/Observation.rs?category=laboratory",
        "launch",
        "",
    ],
)
def test_parse_scope_refuses(text: str) -> None:
    assert parse_scope(text) is None


def test_grant_intersects_with_the_allowed_scopes() -> None:
    allowed = ["system/Patient.rs", "system/Observation.read"]
    assert grant("system/Patient.rs system/Condition.rs", allowed) == ["system/Patient.rs"]
    assert grant("system/Observation.rs", allowed) == ["system/Observation.rs"]
    assert grant("system/*.rs", allowed) == []
    assert grant("system/Patient.cruds", allowed) == []


def test_grant_a_narrower_scope_under_a_wildcard() -> None:
    requested = "system/Patient.read system/Patient.read bogus patient/*.read system/*.rs"
    assert grant(requested, ["system/*.read"]) == ["system/Patient.read", "system/*.rs"]


def test_grant_sums_permissions_of_several_scopes() -> None:
    assert grant("system/*.rs", ["system/*.r", "system/*.s"]) == ["system/*.rs"]


def test_permitted_types() -> None:
    assert permitted_types(["system/*.read"], frozenset("rs")) is None
    assert permitted_types(["system/Patient.rs", "system/Encounter.r"], frozenset("rs")) == {
        "Patient"
    }
    assert permitted_types(["system/*.r", "system/Encounter.s"], frozenset("rs")) == {"Encounter"}
    assert permitted_types(["system/*.write"], frozenset("rs")) == frozenset()


def test_external_scopes_from_scp_roles_and_scope() -> None:
    token = {
        "scp": "system/Patient.rs openid",
        "roles": ["system/Observation.read", 7],
        "scope": ["system/Encounter.rs"],
    }
    assert external_scopes(token) == (
        "system/Patient.rs",
        "system/Observation.read",
        "system/Encounter.rs",
    )


# -- handler checks ------------------------------------------------------------------


def scoped_request(mode: str, scopes: tuple[str, ...] | None) -> web.Request:
    app = web.Application()
    app[AUTH] = AuthState(mode)  # type: ignore[arg-type]
    request = make_mocked_request("GET", "/$export", app=app)
    if scopes is not None:
        request[SCOPES] = scopes
    return request


def test_check_export_types_with_auth_off_allows_everything() -> None:
    assert check_export_types(scoped_request("off", None), ["Patient"]) is None


def test_check_export_types_wildcard() -> None:
    request = scoped_request("smart", ("system/*.read",))
    assert check_export_types(request, ["Patient", "Observation"]) is None


def test_check_export_types_restricts_an_export_of_every_type() -> None:
    request = scoped_request("smart", ("system/Patient.rs", "system/Observation.read"))
    assert check_export_types(request, []) == {"Patient", "Observation"}
    assert check_export_types(request, ["Patient"]) == {"Patient", "Observation"}


def test_check_export_types_refuses_a_type_outside_the_scopes() -> None:
    request = scoped_request("smart", ("system/Patient.rs",))
    with pytest.raises(Forbidden, match="Condition") as caught:
        check_export_types(request, ["Patient", "Condition"])
    assert "insufficient_scope" in caught.value.headers["WWW-Authenticate"]


def test_check_export_types_refuses_a_token_without_read() -> None:
    with pytest.raises(Forbidden):
        check_export_types(scoped_request("smart", ("system/*.write",)), [])


def test_check_export_types_refuses_a_request_without_scopes() -> None:
    with pytest.raises(Unauthorized):
        check_export_types(scoped_request("smart", None), [])


def test_check_import_types() -> None:
    check_import_types(scoped_request("smart", ("system/*.write",)), ["Patient", None])
    typed = scoped_request("smart", ("system/Patient.cu",))
    check_import_types(typed, ["Patient"])
    with pytest.raises(Forbidden, match="Observation"):
        check_import_types(typed, ["Patient", "Observation"])
    with pytest.raises(Forbidden, match="without a type"):
        check_import_types(typed, [None])
    with pytest.raises(Forbidden):
        check_import_types(scoped_request("smart", ("system/*.rs",)), ["Patient"])


# -- client registrations ------------------------------------------------------------


def test_registration_needs_exactly_one_key_source(registration: ClientRegistration) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ClientRegistration(client_id="c", scopes=["system/*.rs"])
    with pytest.raises(ValidationError, match="exactly one"):
        ClientRegistration(
            client_id="c", jwks=registration.jwks, jwks_url=JWKS_URL, scopes=["system/*.rs"]
        )


def test_registration_refuses_a_private_key(rsa_key: rsa.RSAPrivateKey) -> None:
    private = RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    with pytest.raises(ValidationError, match="private key"):
        ClientRegistration(client_id="c", jwks={"keys": [private]}, scopes=["system/*.rs"])


def test_registration_refuses_a_symmetric_key() -> None:
    oct_key = {"kty": "oct", "k": b64(b"0" * 32)}
    with pytest.raises(ValidationError, match="RSA or EC"):
        ClientRegistration(client_id="c", jwks={"keys": [oct_key]}, scopes=["system/*.rs"])


@pytest.mark.parametrize(
    "url", ["http://keys.example.org/jwks.json", "file:///etc/passwd", "https:///jwks"]
)
def test_registration_refuses_an_unsafe_jwks_url(url: str) -> None:
    with pytest.raises(ValidationError, match="https"):
        ClientRegistration(client_id="c", jwks_url=url, scopes=["system/*.rs"])


def test_registration_accepts_loopback_http() -> None:
    url = "http://127.0.0.1:8081/jwks.json"
    assert ClientRegistration(client_id="c", jwks_url=url, scopes=["system/*.rs"]).jwks_url == url


def test_registration_refuses_unknown_scopes(registration: ClientRegistration) -> None:
    with pytest.raises(ValidationError, match="patient/"):
        ClientRegistration(client_id="c", jwks=registration.jwks, scopes=["patient/*.read"])


# -- the replay cache ----------------------------------------------------------------


async def test_replay_cache_claims_once_until_expiry() -> None:
    now = [1000.0]
    cache = MemoryReplayCache(10, clock=lambda: now[0])
    assert await cache.claim("a", 1100)
    assert not await cache.claim("a", 1100)
    assert await cache.claim("b", 1050)
    now[0] = 1100.0
    assert await cache.claim("a", 1400)  # expired: gone from the cache, so usable again
    assert len(cache) == 1  # "b" purged too


async def test_replay_cache_refuses_rather_than_forgets() -> None:
    now = [0.0]
    cache = MemoryReplayCache(2, clock=lambda: now[0])
    assert await cache.claim("a", 10)
    assert await cache.claim("b", 20)
    with pytest.raises(ReplayCacheFull):
        await cache.claim("c", 30)
    assert not await cache.claim("a", 10)
    now[0] = 10.0
    assert await cache.claim("c", 30)


# -- this service's access tokens ----------------------------------------------------


async def test_service_token_round_trip() -> None:
    tokens = ServiceTokens(b"k" * 32, lifetime=300)
    principal = await tokens.verify(tokens.issue(CLIENT, ["system/Patient.rs"]))
    assert principal.client_id == CLIENT
    assert principal.scopes == ("system/Patient.rs",)


async def test_service_token_of_another_key() -> None:
    token = ServiceTokens(b"x" * 32).issue(CLIENT, ["system/*.rs"])
    with pytest.raises(Unauthorized, match="signature"):
        await ServiceTokens(b"k" * 32).verify(token)


async def test_service_token_expired() -> None:
    token = ServiceTokens(b"k" * 32, clock=lambda: time.time() - 3600).issue(CLIENT, [])
    with pytest.raises(Unauthorized, match="expired"):
        await ServiceTokens(b"k" * 32).verify(token)


async def test_service_token_alg_none() -> None:
    now = int(time.time())
    body = {"iss": "urn:exportsvc", "aud": "urn:exportsvc:bulk-data", "sub": CLIENT}
    body |= {"scope": "system/*.rs", "iat": now, "exp": now + 60}
    token = unsigned({"alg": "none", "typ": "at+jwt"}, body) + "."
    with pytest.raises(Unauthorized, match="algorithm"):
        await ServiceTokens(b"k" * 32).verify(token)


async def test_service_token_refuses_another_jwt_of_the_same_key() -> None:
    token = jwt.encode({"sub": CLIENT}, b"k" * 32, algorithm="HS256")  # typ JWT
    with pytest.raises(Unauthorized, match="not an access token"):
        await ServiceTokens(b"k" * 32).verify(token)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "x" * 20_000])
async def test_service_token_garbage(token: str) -> None:
    with pytest.raises(Unauthorized):
        await ServiceTokens(b"k" * 32).verify(token)


def test_service_token_key_too_short() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        ServiceTokens(b"short")


# -- client assertions: the valid ones -----------------------------------------------


async def test_assertion_rs384(assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey) -> None:
    client = await assertions.authenticate(sign(rsa_key, claims()), TOKEN_URL)
    assert client.client_id == CLIENT


async def test_assertion_es384(
    assertions: ClientAssertions, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = sign(ec_key, claims(), alg="ES384", kid="k2")
    assert (await assertions.authenticate(token, TOKEN_URL)).client_id == CLIENT


async def test_assertion_without_kid_when_one_key_fits(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS384")  # smart-fetch's PEM mode
    assert (await assertions.authenticate(token, TOKEN_URL)).client_id == CLIENT


# -- client assertions: hostile ------------------------------------------------------


async def test_assertion_expired(assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, claims(exp=int(time.time()) - 120))
    await refused(assertions, token, "expired")


async def test_assertion_wrong_audience(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(rsa_key, claims(aud="https://other.example.org/auth/token"))
    await refused(assertions, token, "audience")


async def test_assertion_without_audience(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    await refused(assertions, sign(rsa_key, claims(aud=None)), "'aud'")


async def test_assertion_wrong_signature(
    assertions: ClientAssertions, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    await refused(assertions, sign(other_rsa_key, claims()), "signature")


async def test_assertion_tampered_claims(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    header, _, signature = sign(rsa_key, claims()).split(".")
    forged = f"{header}.{b64(json.dumps(claims(exp=int(time.time()) + 200)).encode())}.{signature}"
    await refused(assertions, forged, "signature")


async def test_assertion_alg_none(assertions: ClientAssertions) -> None:
    await refused(assertions, unsigned({"alg": "none", "kid": "k1"}, claims()) + ".", "algorithm")


async def test_assertion_rs256_is_not_accepted(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    await refused(assertions, sign(rsa_key, claims(), alg="RS256"), "algorithm")


async def test_assertion_replayed_jti(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(rsa_key, claims())
    await assertions.authenticate(token, TOKEN_URL)
    await refused(assertions, token, "already used")
    # The same jti in a freshly signed assertion is a replay too.
    again = sign(rsa_key, claims(jti=jwt.decode(token, options={"verify_signature": False})["jti"]))
    await refused(assertions, again, "already used")


async def test_assertion_jti_of_an_invalid_assertion_is_not_used_up(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    body = claims()
    await refused(assertions, sign(other_rsa_key, body), "signature")
    assert (await assertions.authenticate(sign(rsa_key, body), TOKEN_URL)).client_id == CLIENT


async def test_assertion_without_jti(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    await refused(assertions, sign(rsa_key, claims(jti=None)), "'jti'")


async def test_assertion_jku_outside_the_allowlist(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(rsa_key, claims(), jku="https://attacker.example.net/jwks.json")
    await refused(assertions, token, "jku")


async def test_assertion_jku_other_than_the_registered_url(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    registered = ClientRegistration(client_id=CLIENT, jwks_url=JWKS_URL, scopes=["system/*.rs"])
    fetcher = JwksFetcher([JWKS_URL])  # never opened: nothing may be fetched here
    checker = ClientAssertions([registered], fetcher, MemoryReplayCache(10))
    token = sign(rsa_key, claims(), jku="https://keys.example.org/client-2/jwks.json")
    await refused(checker, token, "jku")


async def test_assertion_exp_more_than_five_minutes_ahead(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(rsa_key, claims(exp=int(time.time()) + 600))
    await refused(assertions, token, "five minutes")


async def test_assertion_iss_other_than_sub(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    await refused(assertions, sign(rsa_key, claims(sub="client-2")), "iss and sub")


async def test_assertion_wrong_iss(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    await refused(assertions, sign(rsa_key, claims(iss="client-2")), "iss and sub")


async def test_assertion_unknown_client(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(rsa_key, claims(iss="stranger", sub="stranger"))
    await refused(assertions, token, "no registered client")


async def test_assertion_hs256_with_the_public_key_as_secret(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    """The classic confusion: HMAC keyed with the client's public key, which anyone has."""
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (public_pem, json.dumps(public_jwk(rsa_key, "k1")).encode()):
        signing_input = unsigned({"alg": "HS256", "kid": "k1", "typ": "JWT"}, claims())
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        await refused(assertions, f"{signing_input}.{b64(mac)}", "algorithm")


async def test_assertion_es384_header_over_an_rsa_kid(
    assertions: ClientAssertions, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    await refused(assertions, sign(ec_key, claims(), alg="ES384", kid="k1"), "no key")


async def test_assertion_unknown_kid(
    assertions: ClientAssertions, rsa_key: rsa.RSAPrivateKey
) -> None:
    await refused(assertions, sign(rsa_key, claims(), kid="rotated-away"), "no key")


async def test_assertion_signed_with_a_short_rsa_key(rsa_key: rsa.RSAPrivateKey) -> None:
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    jwks = {"keys": [public_jwk(short, "k1")]}
    weak = ClientRegistration(client_id=CLIENT, jwks=jwks, scopes=["system/*.rs"])
    checker = ClientAssertions([weak], JwksFetcher([]), MemoryReplayCache(10))
    with pytest.warns(jwt.InsecureKeyLengthWarning):
        token = sign(short, claims())
    await refused(checker, token, "too short")


async def test_assertion_malformed(assertions: ClientAssertions) -> None:
    await refused(assertions, "not-a-jwt", "malformed")


def test_select_key_needs_a_kid_among_several(rsa_key: rsa.RSAPrivateKey) -> None:
    keys = [public_jwk(rsa_key, "a"), public_jwk(rsa_key, "b")]
    with pytest.raises(Unauthorized, match="kid"):
        select_key(keys, None, "RS384")
    assert select_key(keys, "b", "RS384").algorithm_name == "RS384"
