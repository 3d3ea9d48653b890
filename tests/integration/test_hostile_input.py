"""Hostile input over a real port: odd names and ids in URLs, oversized requests, nested
JSON, hostile import lines. Each answer is a 4xx OperationOutcome naming the problem,
nothing is queued or written, no secret is echoed or logged, and the service goes on."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from exportsvc.api.keys import RESOURCES
from exportsvc.settings import Settings
from tests.integration.live import ASYNC, FHIR_JSON, Live, live, outcome_of


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Live]:
    async with live(settings) as running:
        yield running


async def answer(service: Live, method: str, path: str, expected: int, **kwargs: Any) -> str:
    """The diagnostics of the OperationOutcome ``method path`` answers with ``expected``."""
    async with service.session.request(method, path, **kwargs) as response:
        body = await response.read()
        return outcome_of(response.status, response.headers["Content-Type"], body, expected)


async def answer_raw(
    service: Live, method: str, target: str, expected: int, headers: dict[str, str] | None = None
) -> str:
    """Like :func:`answer`, the request target sent byte for byte."""
    response = await service.send(method, target, headers)
    return outcome_of(response.status, response.headers["content-type"], response.body, expected)


async def nothing_changed(service: Live) -> None:
    assert await service.jobs() == [], "a refused request queued a job"
    assert service.files() == [], "a refused request wrote a file"
    await service.assert_serving()


def parameters(*pairs: tuple[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Parameters",
            "parameter": [{"name": name, "valueString": value} for name, value in pairs],
        }
    )


# -- odd names and ids in URLs --------------------------------------------------------

ODD_CONTAINERS = [
    "..",
    "../../etc",
    "..%2F..%2Fetc",
    "%2e%2e%2f%2e%2e",
    "abc%0A",  # "$" in a regex lets a final newline through
    "abc%00def",
    "abc%5Cdef",
    "UPPER",
    "a" * 64,
    "%C3%A9t%C3%A9",
    "ab",
]


@pytest.mark.parametrize("container", ODD_CONTAINERS)
async def test_odd_container_names_are_refused(service: Live, container: str) -> None:
    target = f"/$export?_container={container}"
    message = await answer_raw(service, "GET", target, 400, ASYNC)
    assert "_container" in message
    await nothing_changed(service)


ODD_GROUP_IDS = [
    ("..%2F..%2Fetc", 400),
    ("%2e%2e%2f%2e%2e%2fetc", 400),
    ("a%00b", 400),
    ("a%0A", 400),
    ("a%5Cb", 400),
    ("%E2%98%83", 400),
    ("g" * 65, 400),
    ("%2E%2E", 404),  # ".." is a valid FHIR id: looked up, not found
    ("...", 404),
]


@pytest.mark.parametrize(("group", "status"), ODD_GROUP_IDS)
async def test_odd_group_ids_are_refused(service: Live, group: str, status: int) -> None:
    message = await answer_raw(service, "GET", f"/Group/{group}/$export", status, ASYNC)
    assert "Group" in message
    await nothing_changed(service)


ODD_JOB_IDS = [
    "..%2F..%2Fexportsvc.sqlite3",
    "%2e%2e%2f%2e%2e%2fexportsvc.sqlite3",
    "..%5C..%5Cexportsvc.sqlite3",
    "a%00b",
    "%E2%98%83",
    "%27%20OR%201%3D1%20--",
    "j" * 4000,
]
JOB_ROUTES = [
    ("GET", "/_operations/export/{}"),
    ("DELETE", "/_operations/export/{}"),
    ("GET", "/_operations/import/{}"),
    ("DELETE", "/_operations/import/{}"),
    ("GET", "/_output/{}/Patient-0001.ndjson"),
    ("GET", "/_admin/jobs/{}"),
    ("POST", "/_admin/jobs/{}/pause"),
    ("POST", "/_admin/jobs/{}/resume"),
    ("POST", "/_admin/jobs/{}/retry"),
]


@pytest.mark.parametrize("job_id", ODD_JOB_IDS)
async def test_odd_job_ids_are_not_found(service: Live, job_id: str) -> None:
    for method, route in JOB_ROUTES:
        await answer_raw(service, method, route.format(job_id), 404)
    await nothing_changed(service)


async def test_odd_file_names_are_not_found_and_serve_nothing_else(settings: Settings) -> None:
    async with live(settings, with_worker=True) as service:
        async with service.session.get("/$export?_type=Patient", headers=ASYNC) as response:
            assert response.status == 202
            status_url = response.headers["Content-Location"]
        manifest = await _manifest(service, status_url)
        job_id = status_url.rsplit("/", 1)[1]
        good = manifest["output"][0]["url"]
        identity = {"Accept-Encoding": "identity"}
        async with service.session.get(good, headers=identity) as response:
            assert response.status == 200  # the control: a listed file is served
            served = await response.read()
        assert served.startswith(b'{"resourceType":"Patient"')
        names = [
            "..%2F..%2Fexportsvc.sqlite3",
            "%2e%2e%2f%2e%2e%2fexportsvc.sqlite3",
            "..%5C..%5Cexportsvc.sqlite3",
            "..",
            "Patient-0001.ndjson%00",
            "Patient-0001.ndjson%00.txt",
            "Patient-0001.ndjson%2F..%2F..%2Fsecret.key",
            "%E2%80%AEnosj.1000-tneitaP",
            "n" * 4000,
        ]
        before = service.files()
        for name in names:
            message = await answer_raw(service, "GET", f"/_output/{job_id}/{name}", 404)
            assert "SQLite" not in message
        # Dot segments: resolved by the server (RFC 3986), so they leave /_output/ at once.
        for path in (
            f"/_output/{job_id}/../../exportsvc.sqlite3",
            f"/_output/{job_id}/%2e%2e/%2e%2e/exportsvc.sqlite3",
            "/_output/../secret.key",
            "/../../../../etc/passwd",
        ):
            response = await service.send("GET", path)
            assert response.status == 404, path
            assert b"SQLite format" not in response.body
            assert b"root:" not in response.body
        assert service.files() == before
        await service.assert_serving()


async def _manifest(service: Live, status_url: str) -> dict[str, Any]:
    for _ in range(500):
        async with service.session.get(status_url) as response:
            if response.status == 200:
                manifest: dict[str, Any] = await response.json()
                return manifest
            assert response.status == 202, await response.text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{status_url} did not finish")


# -- oversized requests ----------------------------------------------------------------


async def test_a_too_long_url_is_414(service: Live) -> None:
    response = await service.raw(
        b"GET /$export?_type=" + b"Patient," * 1100 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    message = outcome_of(response.status, response.headers["content-type"], response.body, 414)
    assert "URL is longer than 8190 bytes" in message
    await nothing_changed(service)


async def test_a_too_large_header_is_431(service: Live) -> None:
    response = await service.raw(
        b"GET /$export HTTP/1.1\r\nHost: x\r\nPrefer: respond-async\r\n"
        b"X-Padding: " + b"p" * 9000 + b"\r\n\r\n"
    )
    message = outcome_of(response.status, response.headers["content-type"], response.body, 431)
    assert "header is longer than 8190 bytes" in message
    await nothing_changed(service)


async def test_too_many_headers_is_431(service: Live) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % n for n in range(150))
    response = await service.raw(b"GET /metadata HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    message = outcome_of(response.status, response.headers["content-type"], response.body, 431)
    assert "more than 100 headers" in message
    await nothing_changed(service)


@pytest.mark.parametrize(
    "header",
    [
        b"Authorization: Bearer SECRET-TOKEN-0123456789\x01abc",  # a control character
        b"Authorization: Bearer SECRET-TOKEN-0123456789" + b"s" * 9000,  # too long
        b"Authorization : Bearer SECRET-TOKEN-0123456789",  # space before the colon
    ],
)
async def test_a_malformed_authorization_header_is_neither_echoed_nor_logged(
    service: Live, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = await service.raw(b"GET /$export HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
    assert response.status in (400, 431)
    outcome_of(response.status, response.headers["content-type"], response.body, response.status)
    assert b"SECRET-TOKEN" not in response.body
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "http.bad_request" in logged
    assert "SECRET-TOKEN" not in logged
    await nothing_changed(service)


async def test_not_http_at_all_is_400(service: Live) -> None:
    response = await service.raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    message = outcome_of(response.status, response.headers["content-type"], response.body, 400)
    assert "not valid HTTP" in message
    await nothing_changed(service)


async def test_oversized_bodies_are_413(service: Live) -> None:
    big = parameters(("_type", "Patient"), ("_container", "x" * (1 << 20)))
    message = await answer(
        service, "POST", "/$export", 413, data=io.BytesIO(big), headers=FHIR_JSON
    )
    assert "1048576" in message and "EXPORTSVC_MAX_BODY_BYTES" in message
    manifest = orjson.dumps(
        {"inputFormat": "application/fhir+ndjson", "input": [{"url": "x" * (2 << 20)}]}
    )
    message = await answer(
        service, "POST", "/$import", 413, data=io.BytesIO(manifest), headers=FHIR_JSON
    )
    assert "too large" in message
    await nothing_changed(service)


async def test_ten_thousand_parameters_are_refused(service: Live) -> None:
    body = parameters(*[("_type", "Patient")] * 10_000)
    message = await answer(service, "POST", "/$export", 400, data=body, headers=FHIR_JSON)
    assert "10000 parameters" in message and "EXPORTSVC_MAX_PARAMETERS" in message
    # As many as a URL can hold in a GET: still over the limit.
    query = "&".join(["_type=Patient"] * 580)
    message = await answer(service, "GET", f"/$export?{query}", 400, headers=ASYNC)
    assert "580 parameters" in message
    await nothing_changed(service)


async def test_ten_thousand_types_in_one_parameter_are_one_type(service: Live) -> None:
    body = parameters(("_type", ",".join(["Patient"] * 10_000)))
    async with service.session.post("/$export", data=body, headers=FHIR_JSON) as response:
        assert response.status == 202
    (job,) = await service.jobs()
    assert job.request.types == ["Patient"]


async def test_too_many_import_inputs_are_refused(service: Live) -> None:
    body = orjson.dumps({"input": [{"url": f"file:///in/{n}.ndjson"} for n in range(1001)]})
    message = await answer(service, "POST", "/$import", 400, data=body, headers=FHIR_JSON)
    assert "1001 inputs" in message and "EXPORTSVC_IMPORT_MAX_INPUTS" in message
    await nothing_changed(service)


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/$export", NESTED, "not valid JSON"),
        ("/$import", NESTED, "not valid JSON"),
        ("/Patient/$export", b'{"resourceType":"Parameters","parameter":' + NESTED + b"}", "JSON"),
        (
            "/$export",
            b'{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":'
            + b"[" * 1000
            + b"]" * 1000
            + b"}]}",
            "bad value",
        ),
        ("/$import", b'{"input":[{"url":' + b"[" * 1000 + b"]" * 1000 + b"}]}", "needs a url"),
        ("/$export", b'{"resourceType":"Parameters","parameter":5}', "must be a list"),
        ("/$export", b'{"resourceType":"Parameters","parameter":0}', "must be a list"),
        ("/Patient/$export", b'{"resourceType":"Parameters","parameter":{}}', "must be a list"),
        ("/$import", b'{"resourceType":"Parameters","parameter":null}', "must be a list"),
        ("/$import", b'{"resourceType":"Parameters","parameter":true}', "must be a list"),
        (
            "/$import",
            b'{"resourceType":"Parameters","parameter":[{"name":"input","part":'
            b'[{"name":["url"],"valueUri":"x"}]}]}',
            "needs a url",
        ),
        ("/$import", b'{"inputFormat":["ndjson"],"input":[{"url":"x"}]}', "inputFormat"),
        ("/$import", b'{"resourceType":"Parameters","parameter":"input"}', "must be a list"),
    ],
)
async def test_nested_and_misshapen_json_bodies_are_400(
    service: Live, path: str, body: bytes, named: str
) -> None:
    message = await answer(service, "POST", path, 400, data=body, headers=FHIR_JSON)
    assert named in message
    await nothing_changed(service)


# -- hostile lines in import inputs ------------------------------------------------------


def nested(depth: int) -> bytes:
    """A Patient whose extension nests ``depth`` levels in all (objects and arrays)."""
    inner = b"[" * (depth - 3) + b"]" * (depth - 3)
    return b'{"resourceType":"Patient","id":"deep%d","extension":[{"x":' % depth + inner + b"}]}"


async def test_hostile_import_lines_are_refused_and_the_rest_imported(
    settings: Settings, tmp_path: Path
) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    good = [b'{"resourceType":"Patient","id":"good%d"}' % n for n in range(3)]
    lines = [
        good[0],
        b'{"resourceType":"Patient","id":"long","text":"' + b"x" * 9000 + b'"}',
        nested(100),  # at the limit: accepted
        good[1],
        nested(101),  # over the limit
        nested(300),  # orjson reads it, but could not write it back: the batch used to fail
        nested(3000),  # orjson refuses to read it
        b'{"resourceType":"Patient","id":"nul\\u0000"}',
        b'{"resourceType":"Patient","id":"../../etc"}',
        b'{"resourceType":"Patient","id":"uni","name":[{"text":"\\u202e\\u0000\xe2\x98\x83"}]}',
        b"\xff\xfe not utf-8",
        good[2],
    ]
    path = root / "hostile.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    update = {
        "data_dir": settings.data_dir.parent / "importer",
        "import_root": root,
        "import_max_line_bytes": 8192,
        "max_failures": 1,
    }
    async with live(settings.model_copy(update=update), with_worker=True, patients=0) as service:
        body = orjson.dumps({"input": [{"type": "Patient", "url": path.as_uri()}]})
        async with service.session.post("/$import", data=body, headers=FHIR_JSON) as response:
            assert response.status == 202, await response.text()
            status_url = response.headers["Content-Location"]
        manifest = await _manifest(service, status_url)
        reasons = []
        for error in manifest["error"]:
            identity = {"Accept-Encoding": "identity"}
            async with service.session.get(error["url"], headers=identity) as response:
                reasons += [
                    orjson.loads(line)["issue"][0]["diagnostics"]
                    for line in (await response.read()).splitlines()
                ]
        expected = {
            2: "longer than 8192 bytes",
            5: "nested more than 100 levels deep",
            6: "nested more than 100 levels deep",
            7: "not valid JSON",
            8: "invalid id",
            9: "invalid id",
            11: "not valid JSON",
        }
        assert len(reasons) == len(expected), "\n".join(reasons)
        assert manifest["output"] == [{"type": "Patient", "count": 5, "inputUrl": path.as_uri()}]
        for number, reason in expected.items():
            assert any(f" line {number} " in r and reason in r for r in reasons), (number, reasons)
        store = service.app[RESOURCES]
        for id_ in ("good0", "good1", "good2", "deep100", "uni"):
            assert await store.read("Patient", id_) is not None, id_
        for id_ in ("deep101", "deep300", "long"):
            assert await store.read("Patient", id_) is None, id_
        await service.assert_serving()
