"""Authorization over real HTTP: the app of ``create_app`` with ``EXPORTSVC_AUTH=smart``,
``external`` or ``off`` on a local port, client key sets and an external issuer's JWKS
served by a second local server, and the real SMART client ``smart-fetch``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import ClientResponse, ClientSession, web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import SecretStr

from exportsvc.api import create_app
from exportsvc.api.keys import RESOURCES
from exportsvc.auth.app import AuthConfigError
from exportsvc.auth.clients import ClientRegistration
from exportsvc.auth.jwks import JwksFetcher
from exportsvc.errors import KeysUnavailable
from exportsvc.seed import generate
from exportsvc.settings import Settings

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_KEY = "integration-test-token-key-" + "k" * 16
ISSUER = "https://login.example.org/tenant-1/v2.0"
AUDIENCE = "api://exportsvc"
SMART_FETCH = Path(sys.executable).with_name("smart-fetch")

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# -- keys, key sets and tokens ---------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "client-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "client-2": ec.generate_private_key(ec.SECP384R1()),
        "issuer": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "attacker": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


def public_jwk(key: Key, kid: str, alg: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assertion(key: Key, client: str, aud: str, alg: str = "RS384", **claims: Any) -> str:
    body = {"iss": client, "sub": client, "aud": aud, "exp": int(time.time()) + 240}
    body |= {"jti": uuid.uuid4().hex, **claims}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": f"{client}-key"})


class JwksServer:
    """Key sets over HTTP on 127.0.0.1, as a client or an identity provider serves them."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.hits: dict[str, int] = {}
        app = web.Application()
        app.router.add_get("/{name}.json", self._serve)
        self.server = TestServer(app, host="127.0.0.1")

    async def _serve(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        if name not in self.documents:
            raise web.HTTPNotFound()
        return web.json_response(self.documents[name])

    def url(self, name: str) -> str:
        return str(self.server.make_url(f"/{name}.json"))


@pytest.fixture
async def jwks_server(keys: dict[str, Key]) -> AsyncIterator[JwksServer]:
    server = JwksServer()
    server.documents["client-2"] = {"keys": [public_jwk(keys["client-2"], "client-2-key", "ES384")]}
    server.documents["issuer"] = {"keys": [public_jwk(keys["issuer"], "issuer-key", "RS256")]}
    await server.server.start_server()
    yield server
    await server.server.close()


@pytest.fixture
def smart_settings(settings: Settings, keys: dict[str, Key], jwks_server: JwksServer) -> Settings:
    clients = [
        ClientRegistration(
            client_id="client-1",
            jwks={"keys": [public_jwk(keys["client-1"], "client-1-key", "RS384")]},
            scopes=["system/*.read"],
        ),
        ClientRegistration(
            client_id="client-2",
            jwks_url=jwks_server.url("client-2"),
            scopes=["system/Patient.rs", "system/Condition.rs"],
        ),
    ]
    return settings.model_copy(
        update={
            "auth": "smart",
            "auth_clients": clients,
            "auth_client_jwks_urls": [jwks_server.url("client-2")],
            "auth_token_key": SecretStr(TOKEN_KEY),
            "poll_interval_seconds": 0.05,
        }
    )


@pytest.fixture
def external_settings(settings: Settings, jwks_server: JwksServer) -> Settings:
    return settings.model_copy(
        update={
            "auth": "external",
            "auth_issuer": ISSUER,
            "auth_audience": [AUDIENCE],
            "auth_issuer_jwks_url": jwks_server.url("issuer"),
            "poll_interval_seconds": 0.05,
        }
    )


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Service]:
    app = create_app(settings)

    async def seed(app: web.Application) -> None:
        await app[RESOURCES].write(generate(3, seed=5), keep_last_updated=True)

    app.on_startup.append(seed)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession(str(server.make_url(""))) as session:
            yield Service(server, session)
    finally:
        await server.close()


class Service:
    def __init__(self, server: TestServer, session: ClientSession) -> None:
        self.server, self.session = server, session
        self.token_url = str(server.make_url("/auth/token"))

    async def token_response(self, **form: str) -> tuple[int, dict[str, Any], ClientResponse]:
        async with self.session.post("/auth/token", data=form) as response:
            return response.status, await response.json(), response

    async def token(self, key: Key, client: str, scope: str, alg: str = "RS384") -> str:
        status, body, _ = await self.token_response(
            grant_type="client_credentials",
            client_assertion_type=JWT_BEARER,
            client_assertion=assertion(key, client, self.token_url, alg),
            scope=scope,
        )
        assert status == 200, body
        return str(body["access_token"])

    async def kick_off(self, token: str | None, query: str = "") -> ClientResponse:
        headers = dict(ASYNC) | ({"Authorization": f"Bearer {token}"} if token else {})
        async with self.session.get(f"/$export{query}", headers=headers) as response:
            await response.read()
            return response

    async def manifest(self, token: str, status_url: str) -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {token}"}
        for _ in range(500):
            async with self.session.get(status_url, headers=auth) as response:
                if response.status == 200:
                    body: dict[str, Any] = await response.json()
                    return body
                assert response.status == 202, await response.text()
            await asyncio.sleep(0.02)
        raise AssertionError("the export did not finish")


async def outcome(response: ClientResponse) -> str:
    assert response.headers["Content-Type"].startswith("application/fhir+json")
    body = await response.json(content_type=None)
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


@pytest.fixture
async def smart(smart_settings: Settings) -> AsyncIterator[Service]:
    async with serve(smart_settings) as service:
        yield service


# -- smart: discovery and the gate ---------------------------------------------------


async def test_discovery_is_public(smart: Service) -> None:
    async with smart.session.get("/.well-known/smart-configuration") as response:
        assert response.status == 200
        config = await response.json()
    assert config["token_endpoint"] == smart.token_url
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert config["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert config["grant_types_supported"] == ["client_credentials"]
    assert "client-confidential-asymmetric" in config["capabilities"]
    assert "system/*.rs" in config["scopes_supported"]
    async with smart.session.get("/metadata") as response:
        assert response.status == 200
        security = (await response.json(content_type=None))["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    (oauth_uris,) = security["extension"]
    assert oauth_uris["extension"] == [{"url": "token", "valueUri": smart.token_url}]
    async with smart.session.get("/_admin/health") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    "path", ["/$export", "/_operations/export/abc", "/_output/abc/x.ndjson", "/no-such-route"]
)
async def test_no_token_is_401(smart: Service, path: str) -> None:
    async with smart.session.get(path, headers=ASYNC) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "access token" in await outcome(response)


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "token"])
async def test_other_authorization_is_401(smart: Service, header: str) -> None:
    async with smart.session.get("/$export", headers=ASYNC | {"Authorization": header}) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == "Bearer"


async def test_invalid_token_is_401_invalid_token(smart: Service, keys: dict[str, Key]) -> None:
    forged = jwt.encode(
        {"sub": "client-1", "scope": "system/*.read", "exp": int(time.time()) + 60},
        keys["attacker"],
        algorithm="RS256",
        headers={"typ": "at+jwt"},
    )
    response = await smart.kick_off(forged)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_admin_keeps_its_own_gate(smart: Service) -> None:
    async with smart.session.get("/_admin/jobs") as response:  # loopback, no admin token
        assert response.status == 200


# -- smart: exports with tokens ------------------------------------------------------


async def test_export_end_to_end_with_a_token(smart: Service, keys: dict[str, Key]) -> None:
    token = await smart.token(keys["client-1"], "client-1", "system/*.read")
    response = await smart.kick_off(token, "?_type=Patient,Condition")
    assert response.status == 202
    status_url = response.headers["Content-Location"]
    manifest = await smart.manifest(token, status_url)
    assert manifest["requiresAccessToken"] is True
    assert {f["type"] for f in manifest["output"]} == {"Patient", "Condition"}
    file_url = manifest["output"][0]["url"]
    async with smart.session.get(file_url) as response:
        assert response.status == 401
    async with smart.session.get(file_url, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        assert (await r.read()).startswith(b'{"')
    # Another client's token does not see the job.
    other = await smart.token(keys["client-2"], "client-2", "system/Patient.rs", alg="ES384")
    async with smart.session.get(status_url, headers={"Authorization": f"Bearer {other}"}) as r:
        assert r.status == 404


async def test_type_outside_the_scopes_is_403(smart: Service, keys: dict[str, Key]) -> None:
    token = await smart.token(keys["client-2"], "client-2", "system/Patient.rs", alg="ES384")
    response = await smart.kick_off(token, "?_type=Patient,Observation")
    assert response.status == 403
    assert "insufficient_scope" in response.headers["WWW-Authenticate"]
    assert (await smart.kick_off(token, "?_type=Patient")).status == 202


async def test_export_of_every_type_is_limited_to_the_scopes(
    smart: Service, keys: dict[str, Key]
) -> None:
    scope = "system/Patient.rs system/Condition.rs"
    token = await smart.token(keys["client-2"], "client-2", scope, alg="ES384")
    response = await smart.kick_off(token)
    assert response.status == 202
    manifest = await smart.manifest(token, response.headers["Content-Location"])
    assert {f["type"] for f in manifest["output"]} == {"Patient", "Condition"}


# -- smart: the token endpoint -------------------------------------------------------


async def test_token_response(smart: Service, keys: dict[str, Key]) -> None:
    status, body, response = await smart.token_response(
        grant_type="client_credentials",
        client_assertion_type=JWT_BEARER,
        client_assertion=assertion(keys["client-1"], "client-1", smart.token_url),
        scope="system/Patient.rs system/*.write launch",
    )
    assert status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "bearer"
    assert 0 < body["expires_in"] <= 300
    assert body["scope"] == "system/Patient.rs"  # *.write and launch are not allowed


async def test_token_for_a_client_with_a_jwks_url(
    smart: Service, keys: dict[str, Key], jwks_server: JwksServer
) -> None:
    for _ in range(2):
        await smart.token(keys["client-2"], "client-2", "system/Patient.rs", alg="ES384")
    assert jwks_server.hits["client-2"] == 1  # cached


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": "client_credentials"}, 400, "invalid_request"),
        (
            {
                "grant_type": "client_credentials",
                "client_assertion_type": "x",
                "client_assertion": "y",
            },
            401,
            "invalid_client",
        ),
        (
            {
                "grant_type": "client_credentials",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": "not.a.jwt",
                "scope": "system/*.rs",
            },
            401,
            "invalid_client",
        ),
    ],
)
async def test_token_request_errors(
    smart: Service, form: dict[str, str], status: int, error: str
) -> None:
    got, body, response = await smart.token_response(**form)
    assert (got, body["error"]) == (status, error)
    assert body["error_description"]
    assert response.headers["Cache-Control"] == "no-store"
    assert response.content_type == "application/json"


async def test_token_scope_errors(smart: Service, keys: dict[str, Key]) -> None:
    def form(scope: str | None) -> dict[str, str]:
        fields = {
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion(keys["client-2"], "client-2", smart.token_url, "ES384"),
        }
        return fields | ({"scope": scope} if scope is not None else {})

    for scope in (None, "", "system/Observation.rs", "patient/*.read"):
        status, body, _ = await smart.token_response(**form(scope))
        assert (status, body["error"]) == (400, "invalid_scope"), scope


async def test_token_client_id_must_be_the_assertions(smart: Service, keys: dict[str, Key]) -> None:
    status, body, _ = await smart.token_response(
        grant_type="client_credentials",
        client_id="client-2",
        client_assertion_type=JWT_BEARER,
        client_assertion=assertion(keys["client-1"], "client-1", smart.token_url),
        scope="system/*.read",
    )
    assert (status, body["error"]) == (401, "invalid_client")


async def test_token_request_must_be_a_form(smart: Service, keys: dict[str, Key]) -> None:
    body = {"grant_type": "client_credentials"}
    async with smart.session.post("/auth/token", json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_request"
    repeated = "grant_type=client_credentials&grant_type=client_credentials"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with smart.session.post("/auth/token", data=repeated, headers=headers) as response:
        assert (await response.json())["error"] == "invalid_request"
    async with smart.session.get("/auth/token") as response:
        assert response.status == 405


async def test_replayed_assertion_over_http(smart: Service, keys: dict[str, Key]) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion(keys["client-1"], "client-1", smart.token_url),
        "scope": "system/*.read",
    }
    assert (await smart.token_response(**form))[0] == 200
    status, body, _ = await smart.token_response(**form)
    assert (status, body["error"]) == (401, "invalid_client")
    assert "already used" in body["error_description"]


async def test_an_assertion_used_at_one_api_process_is_refused_at_another(
    smart_settings: Settings, keys: dict[str, Key]
) -> None:
    """Two API processes on one store behind one base URL (a load balancer): the jti
    claim is in the store, so a replay to the other process fails too."""
    shared = smart_settings.model_copy(update={"base_url": "http://exportsvc.test"})
    async with serve(shared) as first, serve(shared) as second:
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion(
                keys["client-1"], "client-1", "http://exportsvc.test/auth/token"
            ),
            "scope": "system/*.read",
        }
        assert (await first.token_response(**form))[0] == 200
        status, body, _ = await second.token_response(**form)
        assert (status, body["error"]) == (401, "invalid_client")
        assert "already used" in body["error_description"]


async def test_assertion_for_another_token_url(smart: Service, keys: dict[str, Key]) -> None:
    status, body, _ = await smart.token_response(
        grant_type="client_credentials",
        client_assertion_type=JWT_BEARER,
        client_assertion=assertion(keys["client-1"], "client-1", "http://127.0.0.1/auth/token"),
        scope="system/*.read",
    )
    assert (status, body["error"]) == (401, "invalid_client")


async def test_unreachable_client_jwks_is_503(
    smart: Service, keys: dict[str, Key], jwks_server: JwksServer
) -> None:
    del jwks_server.documents["client-2"]
    status, body, response = await smart.token_response(
        grant_type="client_credentials",
        client_assertion_type=JWT_BEARER,
        client_assertion=assertion(keys["client-2"], "client-2", smart.token_url, "ES384"),
        scope="system/Patient.rs",
    )
    assert (status, body["error"]) == (503, "temporarily_unavailable")
    assert response.headers["Retry-After"]


# -- the key-set fetcher -------------------------------------------------------------


async def test_jwks_fetcher_refetches_on_an_unknown_kid(
    jwks_server: JwksServer, keys: dict[str, Key]
) -> None:
    now = [0.0]
    url = jwks_server.url("client-2")
    fetcher = JwksFetcher([url], ttl=300, min_refresh=30, clock=lambda: now[0])
    await fetcher.open()
    try:
        assert (await fetcher.key(url, "client-2-key", "ES384")).algorithm_name == "ES384"
        rotated = public_jwk(ec.generate_private_key(ec.SECP384R1()), "rotated", "ES384")
        jwks_server.documents["client-2"]["keys"].append(rotated)
        with pytest.raises(Exception, match="no key"):
            await fetcher.key(url, "rotated", "ES384")  # fetched moments ago: not again
        now[0] = 31.0
        assert (await fetcher.key(url, "rotated", "ES384")).algorithm_name == "ES384"
        assert jwks_server.hits["client-2"] == 2
        del jwks_server.documents["client-2"]
        now[0] = 400.0
        await fetcher.key(url, "rotated", "ES384")  # the fetch fails: last keys still serve
        with pytest.raises(Exception, match="allowed URL"):
            await fetcher.key(jwks_server.url("issuer"), "issuer-key", "RS256")
    finally:
        await fetcher.close()


async def test_jwks_fetcher_without_keys_is_unavailable(jwks_server: JwksServer) -> None:
    jwks_server.documents["empty"] = {"keys": []}
    fetcher = JwksFetcher([jwks_server.url("empty")])
    await fetcher.open()
    try:
        with pytest.raises(KeysUnavailable):
            await fetcher.key(jwks_server.url("empty"), None, "RS256")
    finally:
        await fetcher.close()


# -- external issuer -----------------------------------------------------------------


def issuer_token(key: Key, alg: str = "RS256", kid: str = "issuer-key", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 600}
    body |= {"azp": "app-1", "sub": "object-id-1", "roles": ["system/*.read"], **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture
async def external(external_settings: Settings) -> AsyncIterator[Service]:
    async with serve(external_settings) as service:
        yield service


async def test_external_token_end_to_end(external: Service, keys: dict[str, Key]) -> None:
    token = issuer_token(keys["issuer"])
    response = await external.kick_off(token, "?_type=Patient")
    assert response.status == 202
    status_url = response.headers["Content-Location"]
    assert (await external.manifest(token, status_url))["output"]
    # Client identity is azp, else appid, client_id, sub: another app's token sees nothing.
    other = issuer_token(keys["issuer"], azp=None, appid="app-2")
    async with external.session.get(status_url, headers={"Authorization": f"Bearer {other}"}) as r:
        assert r.status == 404
    async with external.session.get("/metadata") as response:
        security = (await response.json(content_type=None))["rest"][0]["security"]
        assert ISSUER in security["description"]


async def test_external_scopes_from_scp(external: Service, keys: dict[str, Key]) -> None:
    token = issuer_token(keys["issuer"], roles=None, scp="system/Patient.rs openid")
    assert (await external.kick_off(token, "?_type=Patient")).status == 202
    assert (await external.kick_off(token, "?_type=Condition")).status == 403


def _hs256_with_the_public_key(keys: dict[str, Key]) -> str:
    public_pem = (
        keys["issuer"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    header = {"alg": "HS256", "kid": "issuer-key", "typ": "JWT"}
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 600,
        "azp": "app-1",
        "roles": ["system/*.read"],
    }
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _alg_none() -> str:
    header = {"alg": "none", "kid": "issuer-key"}
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600, "azp": "app-1"}
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}."


HOSTILE_EXTERNAL = {
    "expired": lambda k: issuer_token(k["issuer"], exp=int(time.time()) - 120),
    "wrong-audience": lambda k: issuer_token(k["issuer"], aud="api://someone-else"),
    "wrong-issuer": lambda k: issuer_token(k["issuer"], iss="https://evil.example.net/v2.0"),
    "no-exp": lambda k: issuer_token(k["issuer"], exp=None),
    "not-yet-valid": lambda k: issuer_token(k["issuer"], nbf=int(time.time()) + 600),
    "wrong-signature": lambda k: issuer_token(k["attacker"]),
    "unknown-kid": lambda k: issuer_token(k["attacker"], kid="attacker-key"),
    "alg-none": lambda k: _alg_none(),
    "hs256-with-the-public-key": _hs256_with_the_public_key,
    "jku-to-the-attacker": lambda k: jwt.encode(
        jwt.decode(issuer_token(k["issuer"]), options={"verify_signature": False}),
        k["attacker"],
        algorithm="RS256",
        headers={"kid": "issuer-key", "jku": "http://127.0.0.1:9/attacker.json"},
    ),
    "no-client-id": lambda k: issuer_token(k["issuer"], azp=None, sub=None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_EXTERNAL))
async def test_external_hostile_token(
    external: Service, keys: dict[str, Key], jwks_server: JwksServer, case: str
) -> None:
    token = HOSTILE_EXTERNAL[case](keys)
    response = await external.kick_off(token, "?_type=Patient")
    assert response.status == 401, case
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert set(jwks_server.hits) <= {"issuer"}  # never any other URL


async def test_external_jwks_unreachable_is_503(
    external: Service, keys: dict[str, Key], jwks_server: JwksServer
) -> None:
    del jwks_server.documents["issuer"]
    response = await external.kick_off(issuer_token(keys["issuer"]), "?_type=Patient")
    assert response.status == 503


# -- configuration -------------------------------------------------------------------


async def test_auth_off_is_a_warning_and_everyone_is_anonymous(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serve(settings.model_copy(update={"auth": "off"})) as service:
        assert [r.levelno for r in caplog.records if r.getMessage() == "auth.off"] == [
            logging.WARNING
        ]
        response = await service.kick_off(None, "?_type=Patient")
        assert response.status == 202
        async with service.session.get("/.well-known/smart-configuration") as r:
            assert r.status == 404
        async with service.session.get("/metadata") as r:
            assert "security" not in (await r.json(content_type=None))["rest"][0]


def test_smart_needs_clients(settings: Settings) -> None:
    with pytest.raises(AuthConfigError, match="EXPORTSVC_AUTH_CLIENTS"):
        create_app(settings.model_copy(update={"auth": "smart", "auth_clients": []}))


def test_default_is_smart(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXPORTSVC_AUTH", raising=False)
    assert Settings().auth == "smart"


def test_client_jwks_url_must_be_allowlisted(smart_settings: Settings) -> None:
    with pytest.raises(AuthConfigError, match="not listed"):
        create_app(smart_settings.model_copy(update={"auth_client_jwks_urls": []}))


def test_external_needs_issuer_audience_and_jwks(external_settings: Settings) -> None:
    with pytest.raises(AuthConfigError, match="EXPORTSVC_AUTH_AUDIENCE"):
        create_app(external_settings.model_copy(update={"auth_audience": []}))


def test_token_key_too_short(smart_settings: Settings) -> None:
    with pytest.raises(AuthConfigError, match="TOKEN_KEY"):
        create_app(smart_settings.model_copy(update={"auth_token_key": SecretStr("short")}))


def test_clients_from_the_environment(
    keys: dict[str, Key], monkeypatch: pytest.MonkeyPatch
) -> None:
    jwks = {"keys": [public_jwk(keys["client-1"], "k", "RS384")]}
    clients = [{"client_id": "c", "jwks": jwks, "scopes": ["system/*.rs"]}]
    monkeypatch.setenv("EXPORTSVC_AUTH_CLIENTS", json.dumps(clients))
    assert Settings().auth_clients[0].client_id == "c"


# -- secrets stay secret -------------------------------------------------------------


def _secrets_of(keys: dict[str, Key]) -> Iterator[str]:
    yield TOKEN_KEY
    for key in keys.values():
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        yield from (line for line in pem.splitlines()[1:-1])
        yield str(
            (RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm).to_jwk(
                key, as_dict=True
            )["d"]
        )


async def test_no_token_or_key_in_responses_or_logs(
    smart: Service, keys: dict[str, Key], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sent: list[str] = []
    bodies: list[str] = []

    async def token_request(client_assertion: str, scope: str = "system/*.read") -> None:
        sent.append(client_assertion)
        async with smart.session.post(
            "/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": client_assertion,
                "scope": scope,
            },
        ) as response:
            body = await response.json()
            if "access_token" in body:
                sent.append(body["access_token"])
            else:
                bodies.append(json.dumps(body))

    good = assertion(keys["client-1"], "client-1", smart.token_url)
    await token_request(good)
    await token_request(good)  # replayed
    await token_request(assertion(keys["attacker"], "client-1", smart.token_url))
    await token_request(assertion(keys["client-1"], "client-1", smart.token_url), "bogus")
    access_token = sent[1]
    for token in (access_token, access_token[:-4] + "AAAA", "x" * 50, sent[0]):
        sent.append(token)
        for path in ("/$export?_type=Patient", "/_operations/export/nope"):
            headers = ASYNC | {"Authorization": f"Bearer {token}"}
            async with smart.session.get(path, headers=headers) as response:
                bodies.append(await response.text())
                bodies.append(str(dict(response.headers)))
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "auth.token_issued" in logged and "auth.token_rejected" in logged
    for secret in [*sent, *_secrets_of(keys)]:
        for part in secret.split("."):
            if len(part) >= 16:  # a JWT's header part is alike in every token: skip none
                assert part not in logged
                assert all(part not in body for body in bodies)


# -- a real SMART client -------------------------------------------------------------


async def test_smart_fetch_authenticates_and_exports(
    smart: Service, keys: dict[str, Key], tmp_path: Path
) -> None:
    if not SMART_FETCH.exists():
        pytest.fail(f"{SMART_FETCH} is missing: pip install smart-fetch==1.0.3 (dev group)")
    key_file = tmp_path / "client-2.jwks"
    private = ECAlgorithm.to_jwk(keys["client-2"], as_dict=True)
    private |= {"kid": "client-2-key", "alg": "ES384", "key_ops": ["sign"]}
    key_file.write_text(json.dumps({"keys": [private]}))
    out = tmp_path / "out"
    process = await asyncio.create_subprocess_exec(
        str(SMART_FETCH),
        "bulk",
        "--fhir-url",
        str(smart.server.make_url("")),
        "--smart-client-id",
        "client-2",
        "--smart-key",
        str(key_file),
        "--type",
        "Patient,Condition",
        "--no-default-filters",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, output.decode(errors="replace")
    saved = {path.name.split(".", 1)[0] for path in out.glob("*.ndjson.gz")}
    assert saved == {"Patient", "Condition"}
