"""STU3 status and manifest options over HTTP: separate-export-status, partial manifests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession
from aiohttp.test_utils import TestServer

from exportsvc.api.keys import DESTINATIONS, OPERATIONS, RESOURCES, SECRETS, SETTINGS
from exportsvc.export_task import ExportItemTask, ExportPlanTask
from exportsvc.records import ExportItemRecord, ExportJobRecord, utcnow
from exportsvc.settings import Settings
from exportsvc.validator import validate_export
from exportsvc.views import JobView
from tests.integration.test_api import ASYNC, serve

SEPARATE = {**ASYNC, "Prefer": "respond-async, separate-export-status"}


async def polls(
    session: ClientSession, status_url: str, seconds: float = 60
) -> AsyncIterator[ClientResponse]:
    """Each answer to polling ``status_url`` every 20 ms; fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        async with session.get(status_url) as response:
            await response.read()
            yield response
        await asyncio.sleep(0.02)
    raise AssertionError(f"the export did not finish within {seconds} s")


async def run_next(test_server: TestServer) -> str:
    """Be the worker for one step: lease the next export or item and run it."""
    app = test_server.app
    record = await app[OPERATIONS].acquire("test-worker", 30, utcnow())
    assert record is not None
    facilities: dict[str, Any] = {
        "operations": app[OPERATIONS],
        "resources": app[RESOURCES],
        "secrets": app[SECRETS],
        "destinations": app[DESTINATIONS],
        "settings": app[SETTINGS],
    }
    if isinstance(record, ExportJobRecord):
        await ExportPlanTask(record, **facilities).run()
    else:
        assert isinstance(record, ExportItemRecord)
        await ExportItemTask(record, **facilities).run()
    return record.id


async def test_separate_export_status(settings: Settings) -> None:
    async with serve(settings, with_worker=False) as (test_server, session):
        async with session.get("/$export?_type=Patient", headers=SEPARATE) as response:
            assert response.status == 202
            assert response.headers["Preference-Applied"] == (
                "respond-async, separate-export-status"
            )
            status_url = response.headers["Content-Location"]
        async with session.get(status_url) as response:  # queued: the request succeeded
            assert response.status == 200
            assert response.headers["X-Export-Status"] == "202 Accepted"
            assert "waiting" in response.headers["X-Progress"]
        await run_next(test_server)
        await run_next(test_server)
        async with session.get(status_url) as response:
            assert response.status == 200
            assert response.headers["X-Export-Status"] == "200 OK"
            assert "Expires" in response.headers
            manifest = await response.json()
        assert {f["type"] for f in manifest["output"]} == {"Patient"}
        async with session.get("/$export?_type=Condition", headers=ASYNC) as response:
            plain = response.headers["Content-Location"]
            assert "Preference-Applied" not in response.headers
        async with session.get(plain) as response:  # without the preference: as before
            assert response.status == 202 and "X-Export-Status" not in response.headers
        async with session.delete(status_url) as response:
            assert response.status == 202
        async with session.get(status_url) as response:  # the status request itself fails
            assert response.status == 404


async def get_json(session: ClientSession, url: str, status: int) -> Any:
    async with session.get(url) as response:
        assert response.status == status, await response.text()
        return await response.json()


def without_link(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k != "link"}


async def test_partial_manifests_grow_by_pages_that_never_change(settings: Settings) -> None:
    async with serve(settings, with_worker=False) as (test_server, session):
        query = "_type=Patient,Condition,Encounter&allowPartialManifests=true"
        async with session.get(f"/$export?{query}", headers=ASYNC) as response:
            status_url = response.headers["Content-Location"]
        async with session.get(status_url) as response:
            assert response.status == 202 and await response.read() == b""
        job_id = await run_next(test_server)  # planned: three items, none done
        async with session.get(status_url) as response:
            assert response.status == 202 and await response.read() == b""

        await run_next(test_server)  # the Patients
        first = await get_json(session, status_url, 202)
        assert {f["type"] for f in first["output"]} == {"Patient"} and "link" not in first
        async with session.get(first["output"][0]["url"]) as response:  # downloadable now
            assert response.status == 200 and await response.read()
        async with session.get(f"{status_url}/page/1") as response:
            assert response.status == 404  # not yet

        await run_next(test_server)  # the Conditions
        again = await get_json(session, status_url, 202)
        assert without_link(again) == first
        assert again["link"] == [{"relation": "next", "url": f"{status_url}/page/1"}]
        second = await get_json(session, again["link"][0]["url"], 200)
        assert {f["type"] for f in second["output"]} == {"Condition"} and "link" not in second
        assert second["transactionTime"] == first["transactionTime"]

        await run_next(test_server)  # the Encounters: done
        done = await get_json(session, status_url, 200)
        assert without_link(done) == first
        second_again = await get_json(session, f"{status_url}/page/1", 200)
        assert without_link(second_again) == second
        third = await get_json(session, second_again["link"][0]["url"], 200)
        assert {f["type"] for f in third["output"]} == {"Encounter"} and "link" not in third
        async with session.get(f"{status_url}/page/3") as response:
            assert response.status == 404

        # The pages together are the whole export.
        app = test_server.app
        job = await app[OPERATIONS].get(job_id)
        assert isinstance(job, ExportJobRecord)
        view = JobView(job, await app[OPERATIONS].children(job_id))
        paged = sorted(
            f["url"].rsplit("/", 1)[1] for m in (first, second, third) for f in m["output"]
        )
        assert paged == sorted(f.name for f in view.files)
        dest = app[DESTINATIONS].for_job(job_id, None)
        report = await validate_export(view, app[RESOURCES], dest)
        assert report.ok, report.render()
        # A page's URLs expire a TTL after the page came to exist, not after each poll.
        completed = view.exports[1].completed_at
        assert completed is not None
        expires = completed + timedelta(seconds=app[SETTINGS].output_ttl_seconds)
        async with session.get(f"{status_url}/page/1") as response:
            assert response.headers["Expires"] == format_datetime(expires, usegmt=True)


@pytest.mark.parametrize("value", ["yes", "1"])
async def test_bad_allow_partial_manifests(settings: Settings, value: str) -> None:
    async with serve(settings, with_worker=False) as (test_server, session):
        url = f"/$export?allowPartialManifests={value}"
        async with session.get(url, headers=ASYNC) as response:
            assert response.status == 400
            assert (
                "allowPartialManifests"
                in (await response.json(content_type=None))["issue"][0]["diagnostics"]
            )
        assert await test_server.app[OPERATIONS].list() == []


async def test_an_export_with_a_worker_and_both_options(settings: Settings) -> None:
    async with serve(settings, with_worker=True) as (_, session):
        query = "_type=Patient,Observation&allowPartialManifests=true"
        async with session.get(f"/$export?{query}", headers=SEPARATE) as response:
            status_url = response.headers["Content-Location"]
        async for response in polls(session, status_url):
            assert response.status == 200
            if response.headers["X-Export-Status"] == "200 OK":
                manifest = await response.json()
                break
        assert {f["type"] for f in manifest["output"]} == {"Patient"}
        page = await get_json(session, manifest["link"][0]["url"], 200)
        assert {f["type"] for f in page["output"]} == {"Observation"}


async def test_organized_output_manifest(settings: Settings) -> None:
    async with serve(settings, with_worker=True) as (_, session):
        query = "_type=Patient,Observation,Condition&organizeOutputBy=Patient"
        async with session.get(f"/$export?{query}", headers=ASYNC) as response:
            status_url = response.headers["Content-Location"]
        async for response in polls(session, status_url):
            if response.status == 200:
                manifest = await response.json()
                break
    assert manifest["outputOrganizedBy"] == "Patient"
    output = manifest["output"]
    assert output and all("type" not in f for f in output)
    urls = [f["url"] for f in output]
    continued = [f for f in output if "continuesInFile" in f]
    assert continued, "max_file_bytes=4096: blocks span files"
    for f in continued:  # it names the file listed right after it
        assert urls[urls.index(f["url"]) + 1] == f["continuesInFile"]
