"""Bulk Data ``$export``: kick-off, status, cancel, and the output files."""

from __future__ import annotations

import contextlib
import math
from datetime import datetime, timedelta
from email.utils import format_datetime
from http import HTTPStatus

import orjson
from aiohttp import web

from exportsvc.api.keys import (
    DESTINATIONS,
    OPERATIONS,
    RESOURCES,
    SECRETS,
    SETTINGS,
    WORKER,
    base_url,
    client_of,
    container_of,
    visible_job,
)
from exportsvc.api.outcome import outcome_response
from exportsvc.auth.middleware import check_export_types
from exportsvc.errors import LimitExceeded, NotFound
from exportsvc.manifest import available_files, manifest, page_files, page_ready_at
from exportsvc.params import parameters_body, parse_export_request
from exportsvc.records import (
    ExportJobRecord,
    ExportKind,
    JobRecord,
    JobStatus,
    OutputFile,
    utcnow,
)
from exportsvc.submit import submit_export
from exportsvc.views import JobView, settled_view

NDJSON = "application/fhir+ndjson"
routes = web.RouteTableDef()


def status_url(request: web.Request, job_id: str) -> str:
    return f"{base_url(request)}/_operations/export/{job_id}"


async def _kickoff(
    request: web.Request, kind: ExportKind, group_id: str | None = None
) -> web.Response:
    if request.method == "POST":
        pairs = parameters_body(await request.read())
    else:
        pairs = list(request.query.items())
    limit = request.app[SETTINGS].max_parameters
    if len(pairs) > limit:
        raise LimitExceeded(
            f"{len(pairs)} parameters: at most {limit} per kick-off (EXPORTSVC_MAX_PARAMETERS)"
        )
    export = parse_export_request(
        kind,
        pairs,
        method=request.method,
        request_url=str(request.url),
        prefer=request.headers.get("Prefer"),
        accept=request.headers.get("Accept"),
        group_id=group_id,
    )
    permitted = check_export_types(request, export.types)
    if permitted is not None and not export.types:
        export.types = sorted(permitted)  # "every type" = every type the token may read
    app = request.app
    stored, created = await submit_export(
        export,
        client=client_of(request),
        operations=app[OPERATIONS],
        resources=app[RESOURCES],
        secrets=app[SECRETS],
        destinations=app[DESTINATIONS],
        settings=app[SETTINGS],
    )
    if created:
        app[WORKER].wake()
    headers = {"Content-Location": status_url(request, stored.id)}
    if stored.request.separate_status:
        headers["Preference-Applied"] = "respond-async, separate-export-status"
    return outcome_response(
        202,
        "export accepted" if created else "an identical export of this client is running",
        code="informational",
        severity="information",
        headers=headers,
    )


@routes.route("*", "/$export")
async def system_export(request: web.Request) -> web.Response:
    _allow(request)
    return await _kickoff(request, ExportKind.SYSTEM)


@routes.route("*", "/Patient/$export")
async def patient_export(request: web.Request) -> web.Response:
    _allow(request)
    return await _kickoff(request, ExportKind.PATIENT)


@routes.route("*", "/Group/{group_id}/$export")
async def group_export(request: web.Request) -> web.Response:
    _allow(request)
    return await _kickoff(request, ExportKind.GROUP, request.match_info["group_id"])


def _allow(request: web.Request) -> None:
    if request.method not in ("GET", "POST"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])


async def _visible_job(request: web.Request) -> ExportJobRecord:
    return await visible_job(request, ExportJobRecord)


def _expiry(view: JobView, request: web.Request) -> datetime:
    ttl = request.app[SETTINGS].output_ttl_seconds
    return (view.completed_at or utcnow()) + timedelta(seconds=ttl)


async def _view(request: web.Request, job: ExportJobRecord) -> JobView:
    return await settled_view(request.app[OPERATIONS], job)


def progress_headers(view: JobView) -> dict[str, str]:
    job = view.job
    done, total = view.resources_done, view.total_estimate
    state = "paused" if job.pause_requested else view.status
    if total is None:
        progress = f"{state}: waiting for a worker"
    else:
        percent = 100 if total == 0 else min(100, math.floor(100 * done / total))
        progress = f"{done}/{total} resources ({percent}%)"
        if state != "running":
            progress = f"{state}: {progress}"
    retry = 1
    started = view.started_at
    if started is not None and total:
        elapsed = (utcnow() - started).total_seconds()
        rate = done / elapsed if elapsed > 0 and done else 0
        remaining = max(total - done, 0)
        retry = math.ceil(remaining / rate / 4) if rate else 2
    waits = [i.retry_after for i in (job, *view.items) if i.status == JobStatus.RETRIABLE]
    if any(waits):
        retry = math.ceil((min(w for w in waits if w) - utcnow()).total_seconds())
    return {"X-Progress": progress[:100], "Retry-After": str(min(max(retry, 1), 120))}


@routes.get("/_operations/export/{job_id}")
async def export_status(request: web.Request) -> web.Response:
    view = await _view(request, await _visible_job(request))
    return _separate(view, await _status(request, view))


@routes.get("/_operations/export/{job_id}/page/{page}")
async def export_manifest_page(request: web.Request) -> web.Response:
    """Page ``k`` >= 1 of a partial-manifests export (page 0 is the status answer)."""
    view = await _view(request, await _visible_job(request))
    job = view.job
    assert isinstance(job, ExportJobRecord)
    page = request.match_info["page"]
    number = int(page) if page.isdecimal() and len(page) < 6 else -1
    files = page_files(view, number) if job.request.partial_manifests and number > 0 else None
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        return _separate(view, _failure(view))
    if files is None:
        raise NotFound(f"no manifest page {page!r} of export {job.id!r}")
    return _separate(view, _manifest_response(request, view, 200, files, number))


async def _status(request: web.Request, view: JobView) -> web.Response:
    job = view.job
    assert isinstance(job, ExportJobRecord)
    if job.status == JobStatus.COMPLETED and not job.request.partial_manifests:
        return _manifest_response(request, view, 200, view.files, None)
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        return _failure(view)
    first = page_files(view, 0) if job.request.partial_manifests else None
    status = 200 if job.status == JobStatus.COMPLETED else 202
    if first is None:
        return web.Response(status=status, headers=progress_headers(view))
    return _manifest_response(request, view, status, first, 0)


def _failure(view: JobView) -> web.Response:
    return outcome_response(
        view.error_status, f"the export failed: {view.last_error or 'unknown error'}"
    )


def _manifest_response(
    request: web.Request, view: JobView, status: int, files: list[OutputFile], page: int | None
) -> web.Response:
    """A manifest (``page`` None: the whole one); 202 ones carry the progress headers."""
    job = view.job
    assert isinstance(job, ExportJobRecord)
    expires = _expiry(view, request)
    ready = page_ready_at(view, page) if page is not None else None
    if ready is not None:  # a page's URLs stay the same until they expire
        ttl = timedelta(seconds=request.app[SETTINGS].output_ttl_seconds)
        expires = ready + ttl
        while expires <= utcnow():
            expires += ttl
    next_url = None
    if page is not None and page_files(view, page + 1) is not None:
        next_url = f"{status_url(request, job.id)}/page/{page + 1}"
    body = manifest(
        view,
        base_url(request),
        request.app[DESTINATIONS].for_job(job.id, job.request.container),
        expires,
        requires_token=request.app[SETTINGS].auth != "off",
        files=files,
        next_url=next_url,
    )
    headers = {"Expires": format_datetime(expires, usegmt=True)}
    if status == 202:
        headers |= progress_headers(view)
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _separate(view: JobView, response: web.Response) -> web.Response:
    """``Prefer: separate-export-status`` at kick-off: the HTTP status answers the status
    request itself (200), and ``X-Export-Status`` carries the export's."""
    job = view.job
    assert isinstance(job, ExportJobRecord)
    if not job.request.separate_status:
        return response
    code = HTTPStatus(response.status)
    response.headers["X-Export-Status"] = f"{code.value} {code.phrase}"
    response.set_status(200)
    return response


@routes.delete("/_operations/export/{job_id}")
async def export_cancel(request: web.Request) -> web.Response:
    record = await _visible_job(request)
    if not await request.app[OPERATIONS].request_cancel(record.id):
        raise NotFound(f"no export job {record.id!r}")
    request.app[WORKER].wake(record.id)
    return outcome_response(
        202,
        "the export was cancelled; its files are being deleted",
        code="informational",
        severity="information",
    )


@routes.get("/_output/{job_id}/{name}")
async def output_file(request: web.Request) -> web.StreamResponse:
    """A file of a finished export (its folder holds its items' files) or import batch
    (error files), as the destination holds it."""
    record = await visible_job(request, JobRecord)
    name = request.match_info["name"]
    files = record.output if record.status == JobStatus.COMPLETED else []
    if isinstance(record, ExportJobRecord):  # and while it runs, its files in manifest pages
        files = available_files(await _view(request, record))
    if name not in {f.name for f in files}:
        raise NotFound(f"no file {name!r} in job {record.id!r}")
    dest = request.app[DESTINATIONS].for_job(record.id, container_of(record))
    headers = {"Content-Type": NDJSON}
    path = dest.local_path(name)
    gzip = "gzip" in request.headers.get("Accept-Encoding", "").lower()
    if path is not None and not gzip:
        response: web.StreamResponse = web.FileResponse(path, headers=headers)
        return response
    response = web.StreamResponse(headers=headers)
    if gzip:
        response.enable_compression(web.ContentCoding.gzip)
    await response.prepare(request)
    async with contextlib.aclosing(dest.read(name)) as chunks:  # a client may hang up
        async for chunk in chunks:
            await response.write(chunk)
    await response.write_eof()
    return response


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()
