"""Operator endpoints over a real port: jobs list, pause/resume, retry, the admin guard."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import ClientSession
from pydantic import SecretStr

from datastore.resources import ExportQuery, Page
from exportsvc.api.keys import DESTINATIONS, OPERATIONS, RESOURCES, SECRETS
from exportsvc.errors import StoreError
from exportsvc.export_task import ExportPlanTask
from exportsvc.records import ExportJobRecord, JobStatus, utcnow
from exportsvc.settings import Settings
from exportsvc.views import JobView
from tests.integration.test_api import ASYNC, finished, outcome, serve


async def kickoff(session: ClientSession, query: str = "") -> str:
    async with session.get(f"/$export{query}", headers=ASYNC) as response:
        assert response.status == 202
        return response.headers["Content-Location"]


async def admin(session: ClientSession, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with session.request(method, f"/_admin{path}", **kw) as response:
        return response.status, await response.json(content_type=None)


async def test_list_pause_resume(settings: Settings) -> None:
    async with serve(settings, with_worker=False) as (_, session):
        status_url = await kickoff(session, "?_type=Patient")
        job_id = status_url.rsplit("/", 1)[1]
        status, body = await admin(session, "GET", "/jobs")
        assert status == 200
        assert [(j["id"], j["status"]) for j in body["jobs"]] == [(job_id, "queued")]
        status, body = await admin(session, "POST", f"/jobs/{job_id}/pause")
        assert status == 202 and body["pauseRequested"] is True
        async with session.get(status_url) as response:
            assert response.status == 202
            assert response.headers["X-Progress"].startswith("paused")
        status, body = await admin(session, "POST", f"/jobs/{job_id}/resume")
        assert status == 202 and body["pauseRequested"] is False
        status, body = await admin(session, "POST", "/jobs/nope/pause")
        assert status == 404
        status, body = await admin(session, "POST", f"/jobs/{job_id}/retry")
        assert status == 409 and "only a failed job" in body["issue"][0]["diagnostics"]


async def test_admin_token_is_required_when_set(settings: Settings) -> None:
    settings = settings.model_copy(update={"admin_token": SecretStr("s3cret-admin")})
    async with serve(settings, with_worker=False) as (_, session):
        async with session.get("/_admin/jobs") as response:
            assert response.status == 403
            assert "admin token" in await outcome(response)
        bad = {"Authorization": "Bearer wrong"}
        assert (await admin(session, "GET", "/jobs", headers=bad))[0] == 403
        good = {"Authorization": "Bearer s3cret-admin"}
        assert (await admin(session, "GET", "/jobs", headers=good))[0] == 200


async def test_a_failed_job_retried_resumes_from_its_checkpoint(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"page_size": 20, "commit_every_pages": 1, "max_failures": 1}
    )
    async with serve(settings, with_worker=True) as (test_server, session):
        store = test_server.app[RESOURCES]
        original = store.page
        served = 0
        broken = True

        async def page(query: ExportQuery, after: int, limit: int) -> Page:
            nonlocal served
            if broken and served == 4:
                raise StoreError("the resource store is unreachable")
            served += 1
            return await original(query, after, limit)

        store.page = page  # type: ignore[method-assign]
        status_url = await kickoff(session, "?_type=Observation")
        job_id = status_url.rsplit("/", 1)[1]
        for _ in range(500):
            async with session.get(status_url) as response:
                if response.status != 202:
                    assert response.status == 503
                    assert "unreachable" in await outcome(response)
                    break
            await asyncio.sleep(0.01)
        operations = test_server.app[OPERATIONS]
        failed = await operations.get(job_id)
        assert failed is not None and failed.status == JobStatus.FAILED
        assert JobView(failed, await operations.children(job_id)).pages_read == 4

        broken, served = False, 0
        status, body = await admin(session, "POST", f"/jobs/{job_id}/retry")
        assert status == 202 and body["status"] in ("queued", "running")
        assert body["failureCount"] == 0
        _, manifest = await finished(session, status_url)
        done = await operations.get(job_id)
        assert done is not None and done.status == JobStatus.COMPLETED
        view = JobView(done, await operations.children(job_id))
        assert served == view.pages_read - 4, "the retry must not start over"
        assert sum(f["count"] for f in manifest["output"]) == view.total_estimate


async def test_workload_for_an_autoscaler(settings: Settings) -> None:
    settings = settings.model_copy(update={"export_item_resources": 50})
    async with serve(settings, with_worker=False, patients=5) as (server, session):
        status, idle = await admin(session, "GET", "/workload")
        assert status == 200 and idle["activeJobs"] == 0 and idle["suggestedWorkers"] == 0
        await kickoff(session, "?_type=Observation")
        status, body = await admin(session, "GET", "/workload")
        assert body["activeJobs"] == 1 and body["queuedItems"] == 1  # not planned yet
        app = server.app
        parent = await app[OPERATIONS].acquire("planner", 30, utcnow())
        assert isinstance(parent, ExportJobRecord)
        await ExportPlanTask(
            parent,
            operations=app[OPERATIONS],
            resources=app[RESOURCES],
            secrets=app[SECRETS],
            destinations=app[DESTINATIONS],
            settings=app[DESTINATIONS].settings,
        ).run()
        status, body = await admin(session, "GET", "/workload")
        planned = await app[OPERATIONS].get(parent.id)
        assert isinstance(planned, ExportJobRecord) and planned.item_count > 1
        assert body["queuedItems"] == planned.item_count and body["runningItems"] == 0
        assert body["remainingResources"] == planned.total_estimate > 0
        assert body["sizeClass"] == "S" and body["suggestedWorkers"] >= 1
