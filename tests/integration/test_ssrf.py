"""``$import`` inputs cannot make the service reach a host it should not (SSRF).

A "trap" server on 127.0.0.1 stands for every internal service: each test counts what
reached it. Only 127.0.0.1 is ever connected to; the other addresses (metadata, private
ranges) are refused before any connection, which is what the tests assert.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exportsvc.api.keys import RESOURCES
from exportsvc.settings import Settings
from tests.integration.live import FHIR_JSON, Live, live, outcome_of

LINES = b'{"resourceType":"Patient","id":"p1"}\n{"resourceType":"Patient","id":"p2"}\n'


class FileServer:
    """Serves ``LINES`` at ``/data.ndjson`` (HEAD and ranged GET); other paths answer as
    set in ``redirects``; counts every request it gets."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.redirects: dict[tuple[str, str], str] = {}
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._serve)
        self.server = TestServer(app, host="127.0.0.1")

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(f"{request.method} {request.path_qs}")
        target = self.redirects.get((request.method, request.path))
        if target is not None:
            raise web.HTTPFound(target)
        if request.path != "/data.ndjson":
            raise web.HTTPNotFound()
        headers = {"ETag": '"v1"', "Accept-Ranges": "bytes"}
        body = LINES
        if request.http_range.start:
            body, status = LINES[request.http_range.start :], 206
        else:
            status = 200
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers | {"Content-Length": str(len(LINES))})
        return web.Response(status=status, body=body, headers=headers)

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    def url(self, path: str = "/data.ndjson", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
async def trap() -> AsyncIterator[FileServer]:
    server = FileServer()
    await server.server.start_server(access_log=None)  # the log checked is the service's
    yield server
    await server.server.close()


@pytest.fixture
async def files() -> AsyncIterator[FileServer]:
    server = FileServer()
    await server.server.start_server(access_log=None)  # the log checked is the service's
    yield server
    await server.server.close()


def manifest(*urls: str) -> bytes:
    return orjson.dumps({"input": [{"type": "Patient", "url": url} for url in urls]})


async def refused(service: Live, url: str) -> str:
    """The 400's diagnostics for an import of ``url``; nothing was queued."""
    async with service.session.post("/$import", data=manifest(url), headers=FHIR_JSON) as resp:
        body = await resp.read()
        message = outcome_of(resp.status, resp.headers["Content-Type"], body, 400)
    assert await service.jobs() == []
    return message


def importer(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update={"import_batch_bytes": 1024, **update})


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("http://127.0.0.1:{port}/data.ndjson", "not on the import allowlist"),
        ("http://localhost:{port}/data.ndjson", "not on the import allowlist"),
        ("http://0.0.0.0:{port}/data.ndjson", "not on the import allowlist"),
        ("http://[::1]:{port}/data.ndjson", "not on the import allowlist"),
        ("http://[::ffff:127.0.0.1]:{port}/data.ndjson", "not on the import allowlist"),
        ("http://2130706433:{port}/data.ndjson", "not on the import allowlist"),
        ("http://127.1:{port}/data.ndjson", "not on the import allowlist"),
        ("http://0x7f.0.0.1:{port}/data.ndjson", "not on the import allowlist"),
        ("http://169.254.169.254/latest/meta-data/", "not on the import allowlist"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "not on the import allowlist"),
        ("http://10.0.0.1/data.ndjson", "not on the import allowlist"),
        ("http://192.168.1.1/data.ndjson", "not on the import allowlist"),
        ("http://allowed.example@127.0.0.1:{port}/data.ndjson", "user info"),
        ("http://127.0.0.1:{port}\\@allowed.example/data.ndjson", "not a valid URL"),
        ("http://allowed.example%00.127.0.0.1:{port}/", "not on the import allowlist"),
        ("http://allowed.example /data.ndjson", "printable ASCII"),
        ("http://[::1/data.ndjson", "not a valid URL"),
        ("gopher://127.0.0.1:{port}/_GET%20/", "only file, http and https"),
        ("file:///etc/passwd", "file inputs are off"),
    ],
)
async def test_internal_addresses_are_refused_before_any_connection(
    settings: Settings, trap: FileServer, url: str, named: str
) -> None:
    update = {"import_allowed_hosts": ["allowed.example"]}
    async with live(importer(settings, **update)) as service:
        message = await refused(service, url.format(port=trap.port))
        assert named in message
        await service.assert_serving()
    assert trap.hits == []


@pytest.mark.parametrize(
    ("allowed", "host", "named"),
    [
        # a host *name* on the allowlist that resolves to loopback (or is re-pointed there)
        ("localhost:{port}", "localhost", "resolves to a refused address"),
        # allowlisted by address, but never allowed
        ("0.0.0.0:{port}", "0.0.0.0", "unspecified"),
        ("[::ffff:0.0.0.0]:{port}", "[::ffff:0.0.0.0]", "unspecified"),
    ],
)
async def test_an_allowlisted_name_is_checked_by_the_address_it_reaches(
    settings: Settings, trap: FileServer, allowed: str, host: str, named: str
) -> None:
    update = {"import_allowed_hosts": [allowed.format(port=trap.port)]}
    async with live(importer(settings, **update)) as service:
        message = await refused(service, trap.url(host=host))
        assert named in message
        assert "loopback" in message or "unspecified" in message
    assert trap.hits == []


async def test_an_allowed_network_lets_a_name_through(
    settings: Settings, files: FileServer
) -> None:
    """The control for the test above: the same name, its network allowed, imports."""
    update = {
        "import_allowed_hosts": [f"localhost:{files.port}"],
        "import_allowed_networks": ["127.0.0.0/8", "::1/128"],
    }
    async with live(importer(settings, **update), with_worker=True, patients=0) as service:
        url = files.url(host="localhost")
        async with service.session.post("/$import", data=manifest(url), headers=FHIR_JSON) as resp:
            assert resp.status == 202, await resp.text()
            status_url = resp.headers["Content-Location"]
        done = await _finished(service, status_url)
        assert done["output"] == [{"type": "Patient", "count": 2, "inputUrl": url}]
        assert await service.app[RESOURCES].read("Patient", "p2") is not None
    assert "HEAD /data.ndjson" in files.hits


async def test_a_redirect_to_a_forbidden_host_is_not_followed(
    settings: Settings, files: FileServer, trap: FileServer
) -> None:
    files.redirects[("HEAD", "/moved.ndjson")] = trap.url()
    files.redirects[("HEAD", "/meta")] = "http://169.254.169.254/latest/meta-data/"
    update = {"import_allowed_hosts": [f"127.0.0.1:{files.port}"]}
    async with live(importer(settings, **update)) as service:
        for path in ("/moved.ndjson", "/meta"):
            message = await refused(service, files.url(path))
            assert "HEAD answered 302" in message and "redirects are not followed" in message
    assert files.hits == ["HEAD /moved.ndjson", "HEAD /meta"]
    assert trap.hits == []


async def test_a_redirect_at_read_time_fails_the_import_and_reaches_nothing(
    settings: Settings, files: FileServer, trap: FileServer
) -> None:
    """The input answers HEAD, then redirects its GET: the batch fails with the reason."""
    files.redirects[("GET", "/data.ndjson")] = trap.url()
    update = {"import_allowed_hosts": [f"127.0.0.1:{files.port}"], "max_failures": 1}
    async with live(importer(settings, **update), with_worker=True, patients=0) as service:
        url = files.url()
        async with service.session.post("/$import", data=manifest(url), headers=FHIR_JSON) as resp:
            assert resp.status == 202, await resp.text()
            status_url = resp.headers["Content-Location"]
        for _ in range(500):
            async with service.session.get(status_url) as response:
                if response.status != 202:
                    message = outcome_of(
                        response.status,
                        response.headers["Content-Type"],
                        await response.read(),
                        400,
                    )
                    break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the import neither failed nor finished")
        assert "GET answered 302" in message and "redirects are not followed" in message
    assert trap.hits == []


async def test_no_sas_token_in_answers_or_logs(
    settings: Settings, files: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sig=SECRET-SAS-SIGNATURE-0123456789"
    update = {"import_allowed_hosts": [f"127.0.0.1:{files.port}"]}
    async with live(importer(settings, **update)) as service:
        for url in (
            files.url(f"/missing.ndjson?{secret}"),  # allowed host, 404
            f"http://169.254.169.254/x.ndjson?{secret}",  # refused host
            files.url(f"/data.ndjson?{secret}\x00"),  # not printable
        ):
            assert "SECRET-SAS" not in await refused(service, url)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "SECRET-SAS" not in logged


async def _finished(service: Live, status_url: str) -> dict[str, Any]:
    for _ in range(500):
        async with service.session.get(status_url) as response:
            if response.status == 200:
                done: dict[str, Any] = await response.json()
                return done
            assert response.status == 202, await response.text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{status_url} did not finish")
