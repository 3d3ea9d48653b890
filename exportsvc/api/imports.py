"""Bulk ``$import``: kick-off, status, cancel.

Kick-off checks every input (allowed source, reachable, size, ETag when given), then
creates the import and all its batches (byte ranges of each input) in one transaction.
Each batch is a work item any worker may run; the import's status follows its batches.
"""

from __future__ import annotations

import math
import uuid
from datetime import timedelta
from typing import Any

import orjson
from aiohttp import web

from datastore.operations import Job
from exportsvc.api.keys import (
    DESTINATIONS,
    OPERATIONS,
    RESOURCES,
    SECRETS,
    SETTINGS,
    SOURCES,
    WORKER,
    base_url,
    client_of,
    visible_job,
)
from exportsvc.api.outcome import outcome_response
from exportsvc.auth.middleware import check_import_types
from exportsvc.errors import Conflict, InvalidRequest, LimitExceeded
from exportsvc.fhir.compartment import RESOURCE_TYPES
from exportsvc.params import parse_prefer
from exportsvc.records import (
    ImportBatchRecord,
    ImportInput,
    ImportJobRecord,
    ImportMode,
    ImportRequest,
    JobStatus,
    utcnow,
)
from exportsvc.views import settled_view

routes = web.RouteTableDef()
NDJSON_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}


def parse_import_body(body: bytes, request_url: str) -> ImportRequest:
    """A FHIR Parameters body, or the JSON manifest form (``inputFormat``, ``input``)."""
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidRequest("the request body must be a Parameters resource or a manifest")
    if doc.get("resourceType") == "Parameters":
        fields, inputs = _from_parameters(doc)
    elif "input" in doc:
        fields = {k: v for k, v in doc.items() if k in ("inputFormat", "mode")}
        inputs = doc["input"] if isinstance(doc["input"], list) else [None]
    else:
        raise InvalidRequest("the request body must be a Parameters resource or a manifest")
    fmt = fields.get("inputFormat", "application/fhir+ndjson")
    if not isinstance(fmt, str) or fmt not in NDJSON_FORMATS:
        raise InvalidRequest(f"inputFormat {str(fmt)[:80]!r} is not supported; use ndjson")
    try:
        mode = ImportMode(fields.get("mode", ImportMode.INCREMENTAL.value))
    except ValueError as exc:
        raise InvalidRequest(
            f"mode {str(fields.get('mode'))[:80]!r} is unknown: IncrementalLoad or InitialLoad"
        ) from exc
    if not inputs:
        raise InvalidRequest("no input: give at least one input with a url")
    return ImportRequest(
        mode=mode, inputs=[_input(i, n) for n, i in enumerate(inputs)], request_url=request_url
    )


def _from_parameters(doc: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    fields: dict[str, Any] = {}
    inputs: list[Any] = []
    params = doc.get("parameter", [])
    if not isinstance(params, list):
        raise InvalidRequest("Parameters.parameter must be a list")
    for param in params:
        if not isinstance(param, dict):
            raise InvalidRequest("Parameters.parameter must hold objects")
        name = param.get("name")
        if name == "input":
            parts = param.get("part") or []
            inputs.append(
                {
                    part["name"]: next((v for k, v in part.items() if k.startswith("value")), None)
                    for part in (parts if isinstance(parts, list) else [])
                    if isinstance(part, dict) and isinstance(part.get("name"), str)
                }
            )
        elif name in ("inputFormat", "mode", "inputSource"):
            fields[name] = next((v for k, v in param.items() if k.startswith("value")), None)
        elif name != "storageDetail":
            raise InvalidRequest(f"unknown parameter {str(name)[:64]!r}")
    return fields, inputs


def _input(raw: Any, index: int) -> ImportInput:
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str) or not raw["url"]:
        raise InvalidRequest(f"input[{index}] needs a url")
    type_ = raw.get("type")
    if type_ is not None and (not isinstance(type_, str) or type_ not in RESOURCE_TYPES):
        raise InvalidRequest(f"input[{index}] type {str(type_)[:64]!r} is not a resource type")
    etag = raw.get("etag")
    if etag is not None and not isinstance(etag, str):
        raise InvalidRequest(f"input[{index}] etag must be a string")
    return ImportInput(type=type_, url=raw["url"], etag=etag)


@routes.post("/$import")
async def kickoff(request: web.Request) -> web.Response:
    if "respond-async" not in parse_prefer(request.headers.get("Prefer")):
        raise InvalidRequest("the header Prefer: respond-async is required for $import")
    app = request.app
    settings = app[SETTINGS]
    wanted = parse_import_body(await request.read(), str(request.url))
    if len(wanted.inputs) > settings.import_max_inputs:
        raise LimitExceeded(
            f"{len(wanted.inputs)} inputs: at most {settings.import_max_inputs} per $import "
            "(EXPORTSVC_IMPORT_MAX_INPUTS)"
        )
    check_import_types(request, [item.type for item in wanted.inputs])
    app[WORKER].expect_import()  # its preparing process starts while the inputs are checked
    for n, item in enumerate(wanted.inputs):
        info = await app[SOURCES].stat(item.url)
        if item.etag is not None and item.etag.strip('"') != info.etag:
            raise InvalidRequest(f"input[{n}] etag {item.etag!r} does not match the input's")
        item.size, item.etag = info.size, info.etag
    if wanted.mode == ImportMode.INITIAL and await app[RESOURCES].current_seq() > 0:
        raise InvalidRequest("mode InitialLoad needs an empty store; use IncrementalLoad")
    parent = ImportJobRecord(
        id=uuid.uuid4().hex,
        client=client_of(request),
        fingerprint=wanted.fingerprint(),
        request=wanted,
        transaction_time=utcnow(),
        status=JobStatus.RUNNING,
        batch_count=0,
    )
    batches = _batches(parent, settings.import_batch_bytes)
    parent.batch_count = len(batches)
    for batch in batches:
        await app[SECRETS].put(batch.secret_name or "", app[DESTINATIONS].secret_for())
    stored, created = await app[OPERATIONS].create_job(
        parent, batches, max_active_per_client=settings.max_active_jobs_per_client
    )
    if not created:
        for batch in batches:
            await app[SECRETS].delete(batch.secret_name or "")
    else:
        app[WORKER].wake()
    return outcome_response(
        202,
        "import accepted" if created else "an identical import of this client is running",
        code="informational",
        severity="information",
        headers={"Content-Location": f"{base_url(request)}/_operations/import/{stored.id}"},
    )


def _batches(parent: ImportJobRecord, size: int) -> list[ImportBatchRecord]:
    batches: list[ImportBatchRecord] = []
    for index, item in enumerate(parent.request.inputs):
        for start in range(0, max(item.size, 1), size):
            batch_id = uuid.uuid4().hex
            batches.append(
                ImportBatchRecord(
                    id=batch_id,
                    client=parent.client,
                    parent_id=parent.id,
                    secret_name=f"import-{batch_id}",
                    input_index=index,
                    input=item,
                    mode=parent.request.mode,
                    start=start,
                    end=min(start + size, item.size),
                    offset=start,
                    # Distinct, increasing: batches are listed (and leased) in input order.
                    created_at=parent.created_at + timedelta(microseconds=len(batches) + 1),
                )
            )
    return batches


def import_status(
    parent: ImportJobRecord, batches: list[Job], base: str
) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
    """(HTTP status, manifest or None, headers) for the import's status URL."""
    items = [b for b in batches if isinstance(b, ImportBatchRecord)]
    total = sum(b.end - b.start for b in items)
    done = sum(
        (b.end - b.start) if b.status == JobStatus.COMPLETED else b.offset - b.start for b in items
    )
    resources = sum(sum(b.counts.values()) for b in items)
    if parent.status == JobStatus.COMPLETED:
        output: dict[tuple[str, str], int] = {}
        for b in items:
            for type_, count in b.counts.items():
                key = (type_, b.input.url)
                output[key] = output.get(key, 0) + count
        errors = [
            {
                "type": "OperationOutcome",
                "count": f.count,
                "inputUrl": b.input.url,
                "url": f"{base}/_output/{b.id}/{f.name}",
            }
            for b in items
            for f in b.output
            if f.role == "error" and f.count
        ]
        manifest = {
            "transactionTime": parent.transaction_time.isoformat().replace("+00:00", "Z"),
            "request": parent.request.request_url,
            "requiresAccessToken": False,
            "output": [
                {"type": t, "count": c, "inputUrl": u} for (t, u), c in sorted(output.items())
            ],
            "error": errors,
        }
        return 200, manifest, {}
    percent = 100 if total == 0 else min(100, math.floor(100 * done / total))
    progress = f"{done}/{total} bytes ({percent}%), {resources} resources"
    return 202, None, {"X-Progress": progress, "Retry-After": "1" if done else "2"}


@routes.get("/_operations/import/{job_id}")
async def status(request: web.Request) -> web.Response:
    parent = await visible_job(request, ImportJobRecord)
    view = await settled_view(request.app[OPERATIONS], parent)
    batches = view.items
    assert isinstance(view.job, ImportJobRecord)
    parent = view.job
    if parent.status == JobStatus.FAILED:
        failed = [b for b in batches if b.status == JobStatus.FAILED]
        reasons = "; ".join(
            f"{b.input.url.split('?')[0]} (bytes {b.start}-{b.end}): {b.last_error}"
            for b in failed
            if isinstance(b, ImportBatchRecord)
        )
        return outcome_response(
            max((b.error_status or 500) for b in failed) if failed else 500,
            f"the import failed: {reasons or 'unknown error'}",
        )
    code, manifest, headers = import_status(parent, batches, base_url(request))
    if manifest is not None:
        return web.json_response(manifest, dumps=lambda v: orjson.dumps(v).decode())
    return web.Response(status=code, headers=headers)


@routes.delete("/_operations/import/{job_id}")
async def cancel(request: web.Request) -> web.Response:
    parent = await visible_job(request, ImportJobRecord)
    if parent.status == JobStatus.COMPLETED:
        raise Conflict(f"import {parent.id} has finished; there is nothing to cancel")
    await request.app[OPERATIONS].request_cancel(parent.id)
    request.app[WORKER].wake(parent.id)
    return outcome_response(
        202, "the import was cancelled", code="informational", severity="information"
    )
