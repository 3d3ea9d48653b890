"""Typed application keys: what the app factory opens and the handlers use."""

from __future__ import annotations

from aiohttp import web

from datastore.operations import OperationDataStore
from datastore.resources import ResourceStore
from destinations import DestinationFactory
from exportsvc.secrets import SecretStore
from exportsvc.settings import Settings
from exportsvc.worker import Worker

SETTINGS = web.AppKey("settings", Settings)
OPERATIONS = web.AppKey("operations", OperationDataStore)
RESOURCES = web.AppKey("resources", ResourceStore)
SECRETS = web.AppKey("secrets", SecretStore)
WORKER = web.AppKey("worker", Worker)
DESTINATIONS = web.AppKey("destinations", DestinationFactory)


def client_of(request: web.Request) -> str:
    """The requesting client: with no authorization configured, everyone is anonymous."""
    return str(request.get("client", "anonymous"))


def base_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].base_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"
