"""Import inputs: where ``$import`` may read from, and ranged reads of them.

Allowed inputs (anything else is refused at kick-off with ``400``, so the service never
sends a request to an arbitrary host):
- ``file://`` paths inside ``EXPORTSVC_IMPORT_ROOT`` (after resolving links);
- ``http(s)://`` URLs whose host (``host`` or ``host:port``) is in
  ``EXPORTSVC_IMPORT_ALLOWED_HOSTS`` and whose addresses pass ``exportsvc.outbound``
  (checked on every connection, on the address connected to); no user info, nothing but
  printable ASCII; redirects are not followed (a redirect is refused, never fetched);
- blobs of the configured Azure account, read with the service's own credential.

``stat`` gives an input's size and a version tag (ETag) used to split it into batches and
to notice a change later; ``read_from`` streams it from a byte offset (ranged reads).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import urllib.parse
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yarl

from destinations import DestinationFactory
from exportsvc.errors import InvalidRequest
from exportsvc.outbound import (
    AddressRefused,
    GuardedResolver,
    IPNetwork,
    on_allowlist,
    parse_address,
    parse_entry,
    parse_networks,
    refusal,
)
from exportsvc.settings import Settings

CHUNK = 1 << 20
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


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
        self._allowlist = [parse_entry(entry) for entry in settings.import_allowed_hosts]
        self.allowed_networks: list[IPNetwork] = [
            *parse_networks(settings.import_allowed_networks),
            *(
                ipaddress.ip_network(host)
                for host, _ in self._allowlist
                if not isinstance(host, str)
            ),
        ]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No DNS cache: every connection resolves, and so checks, its addresses anew.
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.allowed_networks), use_dns_cache=False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
            )
        return self._session

    def check(self, url: str) -> str:
        """The kind of an allowed input URL (``file``, ``http``, ``azure``), else 400."""
        if not _PRINTABLE.fullmatch(url):
            raise InputError(
                f"input {_short(url)}: a URL of printable ASCII only (percent-encode the rest)"
            )
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as exc:  # an unclosed "[", say
            raise InputError(f"input {_short(url)} is not a valid URL") from exc
        if parts.scheme == "file":
            self._local_path(url)
            return "file"
        if parts.scheme in ("http", "https"):
            if self._azure_blob(url) is not None:
                return "azure"
            self._check_http(url)
            return "http"
        raise InputError(f"input {_short(url)}: only file, http and https URLs are accepted")

    def _check_http(self, url: str) -> None:
        try:
            parsed = yarl.URL(url)  # as aiohttp will parse it: no parser differential
        except ValueError as exc:
            raise InputError(f"input {_short(url)} is not a valid URL") from exc
        if parsed.user is not None or parsed.password is not None:
            raise InputError(f"input {_short(url)}: user info in a URL is not accepted")
        host = (parsed.raw_host or "").lower()
        address = parse_address(host)
        if not host or not any(
            on_allowlist(entry, address or host, parsed.explicit_port) for entry in self._allowlist
        ):
            raise InputError(f"input {_short(url)}: host {host!r} is not on the import allowlist")
        if address is not None and (reason := refusal(address, self.allowed_networks)):
            raise InputError(f"input {_short(url)}: {reason}")

    def _local_path(self, url: str) -> Path:
        root = self.settings.import_root
        if root is None:
            raise InputError(f"input {_short(url)}: file inputs are off (EXPORTSVC_IMPORT_ROOT)")
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"input {_short(url)}: a file URL must not name a host")
        try:
            path = Path(urllib.parse.unquote(parts.path, errors="strict")).resolve()
        except (ValueError, OSError) as exc:  # a NUL byte, bad UTF-8, a link loop
            raise InputError(f"input {_short(url)} is not a usable file path") from exc
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
                    raise InputError(
                        f"input {_short(url)}: HEAD answered {response.status}"
                        f"{_REDIRECT if 300 <= response.status < 400 else ''}"
                    )
                size = int(response.headers.get("Content-Length", "-1"))
                if size < 0:
                    raise InputError(f"input {_short(url)}: the server gives no Content-Length")
                etag = response.headers.get("ETag", "").strip('"') or f"size-{size}"
                return SourceInfo(size, etag)
        except InputError:
            raise
        except AddressRefused as exc:
            raise InputError(f"input {_short(url)}: {exc}") from exc
        except Exception as exc:
            raise InputError(f"input {_short(url)} is unreachable: {type(exc).__name__}") from exc

    async def read_from(self, url: str, offset: int) -> AsyncGenerator[bytes, None]:
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
                    raise InputError(
                        f"input {_short(url)}: GET answered {response.status}"
                        f"{_REDIRECT if 300 <= response.status < 400 else ''}"
                    )
                async for data in response.content.iter_chunked(CHUNK):
                    yield data


def _stat_file(path: Path) -> SourceInfo:
    try:
        stat = path.stat()
    except OSError as exc:
        raise InputError(f"input file {path.name!r} cannot be read") from exc
    tag = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}".encode()).hexdigest()
    return SourceInfo(stat.st_size, tag[:32])


_REDIRECT = " (a redirect: redirects are not followed)"


def _short(url: str) -> str:
    """An input URL for messages: no query string (it may hold a SAS token)."""
    return repr(url.split("?", 1)[0][:200])


__all__ = ["InputError", "SourceInfo", "SourceReader"]
