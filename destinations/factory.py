"""Destination type name → client; the job's secret names the type.

A :class:`DestinationFactory` lives as long as the process: it holds the process-wide
Azure clients (one ``BlobServiceClient`` per account and one credential) and closes them
on shutdown. Each job gets its own light :class:`ExportDestinationClient` from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from azure.storage.blob.aio import BlobServiceClient

from destinations.azure_blob import AzureBlobDestination
from destinations.base import ExportDestinationClient
from destinations.filesystem import FilesystemDestination
from exportsvc.errors import ExportSvcError
from exportsvc.settings import Settings

FILESYSTEM = "filesystem"
AZURE_BLOB = "azure-blob"


class DestinationFactory:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._services: dict[str, BlobServiceClient] = {}
        self._containers: dict[str, set[str]] = {}
        """Per account: the containers known to exist (``AzureBlobDestination``)."""
        self._credential: Any = None

    def secret_for(self, container: str | None = None) -> dict[str, Any]:
        """The service's configured destination, for a new job (``_container`` or default)."""
        s = self.settings
        if s.destination == FILESYSTEM:
            root = s.output_root.resolve()
            return {"type": FILESYSTEM, "root": str(root / container if container else root)}
        if s.destination == AZURE_BLOB:
            secret: dict[str, Any] = {
                "type": AZURE_BLOB,
                "container": container or s.azure_container,
            }
            if s.azure_connection_string is not None:
                secret["connection_string"] = s.azure_connection_string.get_secret_value()
            elif s.azure_account_url:
                secret["account_url"] = s.azure_account_url
            else:
                raise ExportSvcError(
                    "EXPORTSVC_DESTINATION=azure-blob needs EXPORTSVC_AZURE_CONNECTION_STRING "
                    "or EXPORTSVC_AZURE_ACCOUNT_URL"
                )
            return secret
        raise ExportSvcError(f"unknown destination type {s.destination!r}")

    def create(
        self, job_id: str, secret: Mapping[str, Any], scope: str | None = None
    ) -> ExportDestinationClient:
        kind = secret.get("type")
        if kind == FILESYSTEM:
            return FilesystemDestination(
                job_id, Path(secret["root"]), block_bytes=self.settings.block_bytes, scope=scope
            )
        if kind == AZURE_BLOB:
            return AzureBlobDestination(
                job_id,
                self._service(secret),
                str(secret["container"]),
                block_bytes=self.settings.block_bytes,
                scope=scope,
                containers=self._containers.setdefault(_account(secret), set()),
            )
        raise ExportSvcError(f"unknown destination type {kind!r}")

    def for_job(self, job_id: str, container: str | None) -> ExportDestinationClient:
        """The service's own view of a job's files (downloads, validation, cleanup)."""
        return self.create(job_id, self.secret_for(container))

    def blob_service(self) -> BlobServiceClient | None:
        """The configured Azure account's client (import inputs), if one is configured."""
        if self.settings.destination != AZURE_BLOB:
            return None
        return self._service(self.secret_for())

    def _service(self, secret: Mapping[str, Any]) -> BlobServiceClient:
        key = _account(secret)
        service = self._services.get(key)
        if service is None:
            options: dict[str, Any] = {
                "retry_total": self.settings.azure_retry_total,
                "retry_backoff_factor": 0.5,
                "retry_backoff_max": 8,
                "connection_timeout": 10,
                "read_timeout": 60,
                "api_version": self.settings.azure_api_version,
            }
            if "connection_string" in secret:
                service = BlobServiceClient.from_connection_string(
                    secret["connection_string"], **options
                )
            else:
                service = BlobServiceClient(
                    secret["account_url"], credential=self._default_credential(), **options
                )
            self._services[key] = service
        return service

    def _default_credential(self) -> Any:
        if self._credential is None:
            from azure.identity.aio import DefaultAzureCredential

            self._credential = DefaultAzureCredential()
        return self._credential

    async def close(self) -> None:
        services, self._services = self._services, {}
        for service in services.values():
            await service.close()
        if self._credential is not None:
            await self._credential.close()
            self._credential = None


def _account(secret: Mapping[str, Any]) -> str:
    """What tells one Azure account (and its credentials) from another in a secret."""
    return str(secret.get("connection_string") or secret.get("account_url"))
