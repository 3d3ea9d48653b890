"""Destination type name → client class; the job's secret names the type."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from destinations.base import ExportDestinationClient
from destinations.filesystem import FilesystemDestination
from exportsvc.errors import ExportSvcError
from exportsvc.settings import Settings

Builder = Callable[[str, Mapping[str, Any], Settings], ExportDestinationClient]


def _filesystem(
    job_id: str, secret: Mapping[str, Any], settings: Settings
) -> FilesystemDestination:
    return FilesystemDestination(job_id, Path(secret["root"]), block_bytes=settings.block_bytes)


BUILDERS: dict[str, Builder] = {"filesystem": _filesystem}


def default_secret(settings: Settings) -> dict[str, Any]:
    """The destination of new jobs, from the service's settings."""
    if settings.destination == "filesystem":
        return {"type": "filesystem", "root": str(settings.output_root.resolve())}
    raise ExportSvcError(f"unknown destination type {settings.destination!r}")


def create_destination(
    job_id: str, secret: Mapping[str, Any], settings: Settings
) -> ExportDestinationClient:
    builder = BUILDERS.get(str(secret.get("type")))
    if builder is None:
        raise ExportSvcError(f"unknown destination type {secret.get('type')!r}")
    return builder(job_id, secret, settings)
