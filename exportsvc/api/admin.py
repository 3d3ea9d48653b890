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
from exportsvc.api.keys import DESTINATIONS, OPERATIONS, SECRETS, SETTINGS, WORKER
from exportsvc.api.outcome import outcome_response
from exportsvc.errors import Forbidden, NotFound
from exportsvc.records import ExportJobRecord, ImportBatchRecord, JobStatus
from exportsvc.submit import retry_failed

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


def job_summary(record: Job, items: list[Job] | None = None) -> dict[str, Any]:
    """One job for operators; an import's progress is the sum of its batches (``items``)."""
    summary: dict[str, Any] = {
        "id": record.id,
        "client": record.client,
        "kind": record.kind,
        "status": "cancelled" if record.cancel_requested else record.status.value,
        "pauseRequested": record.pause_requested,
        "files": len(record.output),
        "failureCount": record.failure_count,
        "restartCount": record.restart_count,
        "lastError": record.last_error,
        "leaseOwner": record.lease.owner,
        "createdAt": record.created_at.isoformat(),
        "completedAt": record.completed_at.isoformat() if record.completed_at else None,
    }
    if isinstance(record, ExportJobRecord):
        summary |= {
            "level": record.request.kind.value,
            "resourcesDone": record.resources_done,
            "resourcesTotal": record.total_estimate,
            "pagesRead": record.pages_read,
        }
    batches = [b for b in items or [] if isinstance(b, ImportBatchRecord)]
    if isinstance(record, ImportBatchRecord):
        batches = [record]
    if batches:
        summary |= {
            "batches": len(batches),
            "batchesDone": sum(b.status == JobStatus.COMPLETED for b in batches),
            "resourcesDone": sum(sum(b.counts.values()) for b in batches),
            "linesRead": sum(b.lines_read for b in batches),
            "errors": sum(b.errors for b in batches),
            "failureCount": max(b.failure_count for b in batches),
            "restartCount": sum(b.restart_count for b in batches),
            "lastError": next((b.last_error for b in batches if b.last_error), None),
        }
    return summary


@routes.get("/_admin/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "runningJobs": request.app[WORKER].running_jobs})


@routes.get("/_admin/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    _require_admin(request)
    try:
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
    except ValueError:
        limit = 100
    operations = request.app[OPERATIONS]
    records = await operations.list(limit=limit)
    jobs = [
        job_summary(r, await operations.children(r.id) if r.kind == "import" else None)
        for r in records
    ]
    return web.json_response({"jobs": jobs})


async def _job(request: web.Request) -> Job:
    job_id = request.match_info["job_id"]
    record = await request.app[OPERATIONS].get(job_id) if len(job_id) <= 64 else None
    if record is None:
        raise NotFound(f"no export job {job_id!r}")
    return record


@routes.get("/_admin/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    _require_admin(request)
    record = await _job(request)
    items = await request.app[OPERATIONS].children(record.id) if record.kind == "import" else None
    return web.json_response(job_summary(record, items))


async def _pause(request: web.Request, pause: bool) -> web.Response:
    _require_admin(request)
    record = await _job(request)
    if not await request.app[OPERATIONS].request_pause(record.id, pause):
        return outcome_response(
            409, f"job {record.id} is {record.status.value}: nothing to pause or resume"
        )
    request.app[WORKER].wake(record.id)
    return web.json_response(job_summary(await _job(request)), status=202)


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
    record = await retry_failed(
        request.match_info["job_id"],
        operations=app[OPERATIONS],
        secrets=app[SECRETS],
        destinations=app[DESTINATIONS],
    )
    app[WORKER].wake()
    return web.json_response(job_summary(record), status=202)


@routes.post("/_admin/drain")
async def drain(request: web.Request) -> web.Response:
    """Drain like SIGTERM: stop acquiring, checkpoint running jobs, release them, exit."""
    _require_admin(request)
    os.kill(os.getpid(), signal.SIGTERM)
    return web.json_response({"status": "draining"}, status=202)
