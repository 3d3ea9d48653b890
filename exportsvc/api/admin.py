"""Operator endpoints under ``/_admin``: jobs, pause/resume/retry, drain, health.

With ``EXPORTSVC_ADMIN_TOKEN`` set they need ``Authorization: Bearer <token>``; without
it they answer loopback clients only, so a default install exposes nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import signal
from typing import Any

from aiohttp import web

from datastore.operations import Job
from exportsvc.api.keys import (
    DESTINATIONS,
    OPERATIONS,
    SECRETS,
    SETTINGS,
    WORKER,
    job_id_shaped,
)
from exportsvc.api.outcome import outcome_response
from exportsvc.errors import Forbidden, InvalidRequest, NotFound
from exportsvc.records import ACTIVE_STATUSES, JobStatus
from exportsvc.submit import retry_failed
from exportsvc.views import JobView

routes = web.RouteTableDef()


def _require_admin(request: web.Request) -> None:
    token = request.app[SETTINGS].admin_token
    if token is not None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(given, token.get_secret_value().encode()):
            raise Forbidden("the admin endpoints need a valid admin token")
        return
    try:
        loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Forbidden("the admin endpoints answer loopback clients only (no admin token set)")


def job_summary(view: JobView) -> dict[str, Any]:
    """One job for operators, its work items summed up."""
    record = view.job
    return {
        "id": record.id,
        "client": record.client,
        "kind": record.kind,
        "status": "cancelled" if record.cancel_requested else view.status,
        "pauseRequested": record.pause_requested,
        "items": len(view.items),
        "itemsDone": view.items_done,
        "resourcesDone": view.resources_done,
        "resourcesTotal": view.total_estimate,
        "pagesRead": view.pages_read,
        "linesRead": sum(b.lines_read for b in view.batches),
        "errors": sum(b.errors for b in view.batches),
        "files": len(view.files),
        "failureCount": view.failure_count,
        "restartCount": view.restart_count,
        "lastError": view.last_error,
        "leaseOwner": record.lease.owner,
        "createdAt": record.created_at.isoformat(),
        "completedAt": view.completed_at.isoformat() if view.completed_at else None,
    }


async def _summary(request: web.Request, record: Job) -> dict[str, Any]:
    items = await request.app[OPERATIONS].children(record.id) if not record.parent_id else []
    return job_summary(JobView(record, items))


@routes.get("/_admin/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "runningJobs": request.app[WORKER].running_jobs})


@routes.get("/_admin/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    _require_admin(request)
    raw = request.query.get("limit", "100")
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 1000):
        raise InvalidRequest(f"limit {raw[:40]!r} is not a whole number from 1 to 1000")
    limit = int(raw)
    records = await request.app[OPERATIONS].list(limit=limit)
    return web.json_response({"jobs": [await _summary(request, r) for r in records]})


async def _job(request: web.Request) -> Job:
    job_id = request.match_info["job_id"]
    record = await request.app[OPERATIONS].get(job_id) if job_id_shaped(job_id) else None
    if record is None:
        raise NotFound(f"no export job {job_id[:80]!r}")
    return record


@routes.get("/_admin/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    _require_admin(request)
    return web.json_response(await _summary(request, await _job(request)))


async def _pause(request: web.Request, pause: bool) -> web.Response:
    _require_admin(request)
    record = await _job(request)
    if not await request.app[OPERATIONS].request_pause(record.id, pause):
        return outcome_response(
            409, f"job {record.id} is {record.status.value}: nothing to pause or resume"
        )
    request.app[WORKER].wake(record.id)
    return web.json_response(await _summary(request, await _job(request)), status=202)


@routes.post("/_admin/jobs/{job_id}/pause")
async def pause_job(request: web.Request) -> web.Response:
    return await _pause(request, True)


@routes.post("/_admin/jobs/{job_id}/resume")
async def resume_job(request: web.Request) -> web.Response:
    return await _pause(request, False)


@routes.post("/_admin/jobs/{job_id}/retry")
async def retry_job(request: web.Request) -> web.Response:
    _require_admin(request)
    app = request.app
    job_id = request.match_info["job_id"]
    if not job_id_shaped(job_id):
        raise NotFound(f"no job {job_id[:80]!r}")
    record = await retry_failed(
        job_id,
        operations=app[OPERATIONS],
        secrets=app[SECRETS],
        destinations=app[DESTINATIONS],
    )
    app[WORKER].wake()
    return web.json_response(await _summary(request, record), status=202)


SIZE_CLASSES = ((100_000, "S"), (1_000_000, "M"), (10_000_000, "L"))


def size_class(resources: int) -> str:
    return next((name for limit, name in SIZE_CLASSES if resources < limit), "XL")


@routes.get("/_admin/workload")
async def workload(request: web.Request) -> web.Response:
    """How much work there is, for an autoscaler (KEDA-style): jobs and work items queued
    or running, the resources still to export, a size class and a worker suggestion."""
    _require_admin(request)
    operations = request.app[OPERATIONS]
    active = [j for j in await operations.list(limit=1000) if j.status in ACTIVE_STATUSES]
    counts = {"queued": 0, "running": 0}
    remaining = import_bytes = 0
    for job in active:
        view = JobView(job, await operations.children(job.id))
        for item in view.items or [job]:
            if item.status in ACTIVE_STATUSES:
                key = (
                    "running" if item.status == JobStatus.RUNNING and item.lease.owner else "queued"
                )
                counts[key] += 1
        remaining += max((view.total_estimate or 0) - view.resources_done, 0)
        import_bytes += sum(b.end - b.offset for b in view.batches if b.status in ACTIVE_STATUSES)
    items = counts["queued"] + counts["running"]
    return web.json_response(
        {
            "activeJobs": len(active),
            "queuedItems": counts["queued"],
            "runningItems": counts["running"],
            "remainingResources": remaining,
            "remainingImportBytes": import_bytes,
            "sizeClass": size_class(remaining + import_bytes // 1000),
            "suggestedWorkers": min(items, max(1, remaining // 250_000 + 1)) if items else 0,
        }
    )


@routes.post("/_admin/drain")
async def drain(request: web.Request) -> web.Response:
    """Drain like SIGTERM: stop acquiring, checkpoint running jobs, release them, exit."""
    _require_admin(request)
    os.kill(os.getpid(), signal.SIGTERM)
    return web.json_response({"status": "draining"}, status=202)
