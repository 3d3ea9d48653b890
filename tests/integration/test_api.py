"""The HTTP surface over a real port (aiohttp test server) on the embedded stack."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from datastore.resources import ExportQuery
from exportsvc.api import create_app
from exportsvc.api.keys import OPERATIONS, RESOURCES
from exportsvc.records import JobStatus, utcnow
from exportsvc.seed import generate
from exportsvc.settings import Settings

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


@contextlib.asynccontextmanager
async def serve(
    settings: Settings, *, with_worker: bool, patients: int = 5
) -> AsyncIterator[tuple[TestServer, ClientSession]]:
    settings = settings.model_copy(
        update={"max_active_jobs_per_client": 3, "poll_interval_seconds": 0.05}
    )
    app = create_app(settings, with_worker=with_worker)

    async def seed(app: web.Application) -> None:
        await app[RESOURCES].write(generate(patients, seed=3), keep_last_updated=True)

    if patients:
        app.on_startup.append(seed)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        async with ClientSession(str(test_server.make_url("")), auto_decompress=False) as session:
            yield test_server, session
    finally:
        await test_server.close()


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[tuple[TestServer, ClientSession]]:
    async with serve(settings, with_worker=True) as running:
        yield running


async def outcome(response: Any) -> str:
    assert response.headers["Content-Type"].startswith("application/fhir+json")
    body = await response.json(content_type=None)
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


async def finished(session: ClientSession, url: str) -> Any:
    for _ in range(400):
        async with session.get(url) as response:
            if response.status == 200:
                return response.headers, await response.json()
            assert response.status == 202
            assert (
                "resources" in response.headers["X-Progress"]
                or "waiting" in response.headers["X-Progress"]
            )
            assert int(response.headers["Retry-After"]) >= 1
        await asyncio.sleep(0.02)
    raise AssertionError("export did not finish")


@pytest.mark.parametrize(
    ("path", "headers", "named", "status"),
    [
        ("/$export", {"Accept": "application/fhir+json"}, "respond-async", 400),
        ("/$export?_type=Nope", ASYNC, "'Nope'", 400),
        ("/$export?_since=last-week", ASYNC, "_since", 400),
        ("/$export?_until=2024-01-01", ASYNC, "_until", 400),
        ("/$export?foo=1", ASYNC, "'foo'", 400),
        ("/$export?_outputFormat=text/csv", ASYNC, "_outputFormat", 400),
        ("/$export?_typeFilter=Observation%3Fvalue-quantity%3D1", ASYNC, "value-quantity", 400),
        ("/$export?_typeFilter=Observation%3F_sort%3Ddate", ASYNC, "_sort", 400),
        ("/$export?_typeFilter=Observation%3Fcode%3Aabove%3D1", ASYNC, ":above", 400),
        ("/$export?_typeFilter=Observation%3Fdate%3Dsoon", ASYNC, "date=soon", 400),
        ("/$export?_typeFilter=Observation", ASYNC, "ResourceType?", 400),
        ("/$export?_elements=Patient.name.family", ASYNC, "Patient.name.family", 400),
        ("/$export?includeAssociatedData=_custom,Nope", ASYNC, "'_custom', 'Nope'", 400),
        ("/$export?organizeOutputBy=Encounter", ASYNC, "organizeOutputBy 'Encounter'", 400),
        (
            "/$export?organizeOutputBy=Patient&includeAssociatedData=LatestProvenanceResources",
            ASYNC,
            "cannot be combined with organizeOutputBy",
            400,
        ),
        ("/$export", {**ASYNC, "Accept": "text/html"}, "Accept", 400),
        ("/Group/does-not-exist/$export", ASYNC, "Group/does-not-exist", 404),
    ],
)
async def test_bad_kickoffs_are_named_and_queue_nothing(
    server: tuple[TestServer, ClientSession],
    path: str,
    headers: dict[str, str],
    named: str,
    status: int,
) -> None:
    test_server, session = server
    async with session.get(path, headers=headers) as response:
        assert response.status == status
        assert named in await outcome(response)
    assert await test_server.app[OPERATIONS].list() == []


async def test_post_patient_at_system_level_is_refused(
    server: tuple[TestServer, ClientSession],
) -> None:
    _, session = server
    body = {
        "resourceType": "Parameters",
        "parameter": [{"name": "patient", "valueReference": {"reference": "Patient/x"}}],
    }
    async with session.post("/$export", headers=ASYNC, data=orjson.dumps(body)) as response:
        assert response.status == 400
        assert "system-level" in await outcome(response)
    async with session.post("/$export", headers=ASYNC, data=b"not json") as response:
        assert response.status == 400
        assert "JSON" in await outcome(response)


async def test_export_poll_download_delete(server: tuple[TestServer, ClientSession]) -> None:
    _, session = server
    async with session.get("/$export?_type=Patient,Observation", headers=ASYNC) as response:
        assert response.status == 202
        status_url = response.headers["Content-Location"]
    assert status_url.startswith("http://127.0.0.1:")
    headers, manifest = await finished(session, status_url)
    assert "Expires" in headers
    assert manifest["requiresAccessToken"] is False
    assert manifest["request"].endswith("/$export?_type=Patient,Observation")
    files = manifest["output"]
    assert len([f for f in files if f["type"] == "Observation"]) > 1
    for f in files:
        async with session.get(f["url"], headers={"Accept-Encoding": "gzip"}) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/fhir+ndjson"
            assert response.headers["Content-Encoding"] == "gzip"
            lines = gzip.decompress(await response.content.read()).splitlines()
        assert len(lines) == f["count"]
        assert {orjson.loads(line)["resourceType"] for line in lines} == {f["type"]}
    for f in [*files, *manifest["error"]]:
        async with session.get(f["url"], headers={"Accept-Encoding": "identity"}) as response:
            assert "Content-Encoding" not in response.headers
            body = await response.read()
        assert len(body.splitlines()) == f["count"]
        assert len(body) == f["fileSize"] > 0

    async with session.delete(status_url) as response:
        assert response.status == 202
    for method in ("GET", "DELETE"):
        async with session.request(method, status_url) as response:
            assert response.status == 404
            await outcome(response)
    async with session.get(files[0]["url"]) as response:
        assert response.status == 404


async def test_same_request_returns_the_active_job_and_limits_apply(settings: Settings) -> None:
    async with serve(settings, with_worker=False) as (test_server, session):  # jobs stay queued
        urls = []
        for query in ("_type=Patient", "_type=Patient", "_type=Condition", "_type=Encounter"):
            async with session.get(f"/$export?{query}", headers=ASYNC) as response:
                assert response.status == 202
                urls.append(response.headers["Content-Location"])
        assert urls[0] == urls[1]
        assert len(set(urls)) == 3
        async with session.get("/$export?_type=Procedure", headers=ASYNC) as response:
            assert response.status == 429
            assert int(response.headers["Retry-After"]) > 0
            assert "limit 3" in await outcome(response)
        assert len(await test_server.app[OPERATIONS].list()) == 3
        # A cancelled job frees its slot at once.
        async with session.delete(urls[0]) as response:
            assert response.status == 202
        async with session.get("/$export?_type=Procedure", headers=ASYNC) as response:
            assert response.status == 202


async def test_metadata_lists_types_and_operations(
    server: tuple[TestServer, ClientSession],
) -> None:
    _, session = server
    async with session.get("/metadata") as response:
        assert response.status == 200
        statement = await response.json(content_type=None)
    rest = statement["rest"][0]
    types = {r["type"] for r in rest["resource"]}
    assert {"Patient", "Observation", "Group", "Practitioner"} <= types
    assert rest["operation"][0]["name"] == "export"
    supported = rest["operation"][0]["documentation"]
    for name in (
        "_since",
        "_type",
        "includeAssociatedData (LatestProvenanceResources",
        "organizeOutputBy (Patient)",
        "allowPartialManifests",
        "separate-export-status",
    ):
        assert name in supported
    patient = next(r for r in rest["resource"] if r["type"] == "Patient")
    assert patient["operation"][0]["definition"].endswith("patient-export")


async def test_unknown_route_and_method_are_outcomes(
    server: tuple[TestServer, ClientSession],
) -> None:
    _, session = server
    async with session.get("/nothing/here") as response:
        assert response.status == 404
        await outcome(response)
    async with session.put("/$export", headers=ASYNC) as response:
        assert response.status == 405
        await outcome(response)
    async with session.get("/_operations/export/" + "x" * 500) as response:
        assert response.status == 404
        await outcome(response)


async def test_a_job_left_unsettled_by_a_dead_worker_settles_on_poll(
    server: tuple[TestServer, ClientSession],
) -> None:
    test_server, session = server
    async with session.get("/$export?_type=Patient", headers=ASYNC) as response:
        status_url = response.headers["Content-Location"]
    await finished(session, status_url)
    operations = test_server.app[OPERATIONS]
    job = await operations.get(status_url.rsplit("/", 1)[1])
    assert job is not None
    # A worker died between its item's final save and the settle of the export.
    job.status = JobStatus.RUNNING
    await operations.save(job)
    _, manifest = await finished(session, status_url)
    assert manifest["output"][0]["type"] == "Patient"
    settled = await operations.get(job.id)
    assert settled is not None and settled.status == JobStatus.COMPLETED


async def test_a_since_export_lists_deletions_in_its_manifest(
    server: tuple[TestServer, ClientSession],
) -> None:
    test_server, session = server
    store = test_server.app[RESOURCES]
    since = utcnow()
    page = await store.page(ExportQuery("Condition", await store.current_seq()), 0, 2)
    ids = [orjson.loads(raw)["id"] for raw in page.raws]
    for id_ in ids:
        await store.delete("Condition", id_)
    query = f"_type=Condition,Patient&_since={quote(since.isoformat())}"
    async with session.get(f"/$export?{query}", headers=ASYNC) as response:
        status_url = response.headers["Content-Location"]
    _, manifest = await finished(session, status_url)
    assert manifest["output"] == []
    [deleted] = manifest["deleted"]
    assert (deleted["type"], deleted["count"]) == ("Bundle", 2)
    async with session.get(deleted["url"], headers={"Accept-Encoding": "identity"}) as response:
        body = await response.read()
    assert len(body) == deleted["fileSize"]
    urls = sorted(orjson.loads(line)["entry"][0]["request"]["url"] for line in body.splitlines())
    assert urls == sorted(f"Condition/{id_}" for id_ in ids)
    async with session.get("/$export?_type=Condition", headers=ASYNC) as response:
        _, without_since = await finished(session, response.headers["Content-Location"])
    assert "deleted" not in without_since
