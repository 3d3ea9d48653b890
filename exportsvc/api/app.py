"""The aiohttp app factory: stores, secrets and the in-process worker in cleanup contexts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from exportsvc.api import admin, export, imports, metadata, openapi
from exportsvc.api.keys import (
    DESTINATIONS,
    OPERATIONS,
    RESOURCES,
    SECRETS,
    SETTINGS,
    SOURCES,
    WORKER,
)
from exportsvc.api.outcome import outcome_middleware
from exportsvc.auth.app import setup_auth
from exportsvc.auth.middleware import AUTH, auth_middleware
from exportsvc.auth.replay import StoreReplayCache
from exportsvc.runtime import open_runtime
from exportsvc.settings import Settings
from exportsvc.sources import SourceReader
from exportsvc.worker import Worker


def create_app(settings: Settings, *, with_worker: bool = True) -> web.Application:
    app = web.Application(
        middlewares=[outcome_middleware, auth_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    setup_auth(app, settings)
    app.add_routes(export.routes)
    app.add_routes(metadata.routes)
    app.add_routes(admin.routes)
    app.add_routes(imports.routes)
    app.add_routes(openapi.routes)
    app.cleanup_ctx.append(_runtime)
    if with_worker:
        app.cleanup_ctx.append(_worker)
    return app


async def _runtime(app: web.Application) -> AsyncIterator[None]:
    async with open_runtime(app[SETTINGS]) as runtime:
        app[OPERATIONS] = runtime.operations
        app[RESOURCES] = runtime.resources
        app[SECRETS] = runtime.secrets
        app[DESTINATIONS] = runtime.destinations
        app[WORKER] = runtime.worker()
        app[SOURCES] = SourceReader(runtime.settings, runtime.destinations)
        assertions = app[AUTH].assertions
        if assertions is not None:  # a jti used at any API process is used at all of them
            assertions.replay = StoreReplayCache(runtime.operations)
        try:
            yield
        finally:
            await app[SOURCES].close()


async def _worker(app: web.Application) -> AsyncIterator[None]:
    worker: Worker = app[WORKER]
    task = asyncio.create_task(worker.run(), name="worker")
    yield
    worker.stop()
    await task
