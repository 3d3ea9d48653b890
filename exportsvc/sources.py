"""Import inputs: where ``$import`` may read from, and ranged reads of them.

Allowed inputs (anything else is refused at kick-off with ``400``, so the service never
sends a request to an arbitrary host):
- ``file://`` paths inside ``EXPORTSVC_IMPORT_ROOT`` (after resolving links);
- ``http(s)://`` URLs whose host (``host`` or ``host:port``) is in
  ``EXPORTSVC_IMPORT_ALLOWED_HOSTS``; redirects are not followed;
- blobs of the configured Azure account, read with the service's own credential.

``stat`` gives an input's size and a version tag (ETag) used to split it into batches and
to notice a change later; ``read_from`` streams it from a byte offset (ranged reads).
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from destinations import DestinationFactory
from exportsvc.errors import InvalidRequest
from exportsvc.settings import Settings

CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class SourceInfo:
    size: int
    etag: str


class InputError(InvalidRequest):
    """An import input cannot be read."""


class SourceReader:
    def __init__(self, settings: Settings, destinations: DestinationFactory) -> None:
        self.settings = settings
        self.destinations = destinations
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
            )
        return self._session

    def check(self, url: str) -> str:
        """The kind of an allowed input URL (``file``, ``http``, ``azure``), else 400."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":
            self._local_path(url)
            return "file"
        if parts.scheme in ("http", "https"):
            if self._azure_blob(url) is not None:
                return "azure"
            host = (parts.hostname or "").lower()
            allowed = {h.lower() for h in self.settings.import_allowed_hosts}
            if host and (host in allowed or parts.netloc.lower() in allowed):
                return "http"
            raise InputError(f"input {_short(url)}: host {host!r} is not on the import allowlist")
        raise InputError(f"input {_short(url)}: only file, http and https URLs are accepted")

    def _local_path(self, url: str) -> Path:
        root = self.settings.import_root
        if root is None:
            raise InputError(f"input {_short(url)}: file inputs are off (EXPORTSVC_IMPORT_ROOT)")
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"input {_short(url)}: a file URL must not name a host")
        path = Path(urllib.parse.unquote(parts.path)).resolve()
        if not path.is_relative_to(root.resolve()):
            raise InputError(f"input {_short(url)}: outside the import root")
        return path

    def _azure_blob(self, url: str) -> tuple[str, str] | None:
        """(container, blob) when ``url`` is a blob of the configured Azure account."""
        service = self.destinations.blob_service()
        if service is None:
            return None
        endpoint = service.url.rstrip("/") + "/"
        if not url.startswith(endpoint):
            return None
        container, _, blob = urllib.parse.unquote(url[len(endpoint) :].split("?")[0]).partition("/")
        return (container, blob) if container and blob else None

    async def stat(self, url: str) -> SourceInfo:
        kind = self.check(url)
        try:
            if kind == "file":
                return await asyncio.to_thread(_stat_file, self._local_path(url))
            if kind == "azure":
                container, blob = self._azure_blob(url) or ("", "")
                service = self.destinations.blob_service()
                assert service is not None
                props = await service.get_blob_client(container, blob).get_blob_properties()
                return SourceInfo(int(props.size), str(props.etag).strip('"'))
            async with self._http().head(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise InputError(f"input {_short(url)}: HEAD answered {response.status}")
                size = int(response.headers.get("Content-Length", "-1"))
                if size < 0:
                    raise InputError(f"input {_short(url)}: the server gives no Content-Length")
                etag = response.headers.get("ETag", "").strip('"') or f"size-{size}"
                return SourceInfo(size, etag)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"input {_short(url)} is unreachable: {type(exc).__name__}") from exc

    async def read_from(self, url: str, offset: int) -> AsyncIterator[bytes]:
        """The input's bytes from ``offset`` to its end, in chunks."""
        kind = self.check(url)
        if kind == "file":
            with await asyncio.to_thread(open, self._local_path(url), "rb") as handle:
                await asyncio.to_thread(handle.seek, offset)
                while data := await asyncio.to_thread(handle.read, CHUNK):
                    yield data
        elif kind == "azure":
            container, blob = self._azure_blob(url) or ("", "")
            service = self.destinations.blob_service()
            assert service is not None
            stream = await service.get_blob_client(container, blob).download_blob(offset=offset)
            async for data in stream.chunks():
                yield data
        else:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            async with self._http().get(url, headers=headers, allow_redirects=False) as response:
                if response.status not in (200, 206) or (offset and response.status != 206):
                    raise InputError(f"input {_short(url)}: GET answered {response.status}")
                async for data in response.content.iter_chunked(CHUNK):
                    yield data


def _stat_file(path: Path) -> SourceInfo:
    try:
        stat = path.stat()
    except OSError as exc:
        raise InputError(f"input file {path.name!r} cannot be read") from exc
    tag = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}".encode()).hexdigest()
    return SourceInfo(stat.st_size, tag[:32])


def _short(url: str) -> str:
    """An input URL for messages: no query string (it may hold a SAS token)."""
    return repr(url.split("?", 1)[0][:200])


__all__ = ["InputError", "SourceInfo", "SourceReader"]
