"""Typed application keys: what the app factory opens and the handlers use."""

from __future__ import annotations

import re
from typing import TypeVar

from aiohttp import web

from datastore.operations import OperationDataStore
from datastore.resources import ResourceStore
from destinations import DestinationFactory
from exportsvc.auth.middleware import CLIENT
from exportsvc.errors import NotFound
from exportsvc.records import ExportJobRecord, JobRecord
from exportsvc.secrets import SecretStore
from exportsvc.settings import Settings
from exportsvc.sources import SourceReader
from exportsvc.worker import Worker

R = TypeVar("R", bound=JobRecord)
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SETTINGS = web.AppKey("settings", Settings)
OPERATIONS = web.AppKey("operations", OperationDataStore)
RESOURCES = web.AppKey("resources", ResourceStore)
SECRETS = web.AppKey("secrets", SecretStore)
WORKER = web.AppKey("worker", Worker)
DESTINATIONS = web.AppKey("destinations", DestinationFactory)
SOURCES = web.AppKey("sources", SourceReader)


def client_of(request: web.Request) -> str:
    """The requesting client: with no authorization configured, everyone is anonymous."""
    return str(request.get(CLIENT, "anonymous"))


def base_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].base_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"


def job_id_shaped(job_id: str) -> bool:
    """Whether ``job_id`` could name a job (ids are 32 hex digits; this allows more):
    anything else is not looked up at all (a NUL byte, say, fails in PostgreSQL)."""
    return JOB_ID.fullmatch(job_id) is not None


async def visible_job(request: web.Request, kind: type[R]) -> R:
    """The job (or work item) named by ``{job_id}`` in the URL, of ``kind``, if this
    client may see it: else 404, so no other client's job is ever confirmed to exist."""
    job_id = request.match_info["job_id"]
    record = await request.app[OPERATIONS].get(job_id) if job_id_shaped(job_id) else None
    if not isinstance(record, kind) or record.client != client_of(request) or not record.visible:
        raise NotFound(f"no {kind.__name__.removesuffix('Record')} {job_id[:80]!r}")
    return record


def container_of(record: JobRecord) -> str | None:
    return record.request.container if isinstance(record, ExportJobRecord) else None
