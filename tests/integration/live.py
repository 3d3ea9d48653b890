"""The app served the way ``exportsvc serve`` serves it (``ServiceRunner``: the service's
HTTP limits and protocol-error answers) on a real 127.0.0.1 port, for tests that must
see exactly what a client sees, down to raw bytes on the socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientSession, web

from exportsvc.api import create_app
from exportsvc.api.keys import OPERATIONS, RESOURCES
from exportsvc.api.server import ServiceRunner
from exportsvc.seed import generate
from exportsvc.settings import Settings

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
FHIR_JSON = {**ASYNC, "Content-Type": "application/fhir+json"}


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Live:
    app: web.Application
    settings: Settings
    host: str
    port: int
    session: ClientSession

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def raw(self, request: bytes) -> RawResponse:
        """Send ``request`` as it is on a new connection; the response, read to its end."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
            return RawResponse(int(lines[0].split()[1]), headers, body)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def send(
        self, method: str, target: str, headers: dict[str, str] | None = None
    ) -> RawResponse:
        """``method target`` with ``target`` sent exactly as given (a client library
        would normalise ``..`` and re-encode)."""
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        return await self.raw(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def jobs(self) -> list[Any]:
        return list(await self.app[OPERATIONS].list(limit=1000))

    def files(self) -> list[Path]:
        """Every file the filesystem destination holds."""
        root = self.settings.output_root
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    async def assert_serving(self) -> None:
        async with self.session.get("/metadata") as response:
            assert response.status == 200
            assert (await response.json(content_type=None))["resourceType"] == (
                "CapabilityStatement"
            )


@contextlib.asynccontextmanager
async def live(
    settings: Settings, *, with_worker: bool = False, patients: int = 3
) -> AsyncIterator[Live]:
    settings = settings.model_copy(update={"poll_interval_seconds": 0.05})
    app = create_app(settings, with_worker=with_worker)

    async def seed(app: web.Application) -> None:
        await app[RESOURCES].write(generate(patients, seed=3), keep_last_updated=True)

    if patients:
        app.on_startup.append(seed)
    runner = ServiceRunner(app, settings)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with ClientSession(f"http://{host}:{port}", auto_decompress=False) as session:
            yield Live(app, settings, host, port, session)
    finally:
        await runner.cleanup()


def outcome_of(status: int, content_type: str, body: bytes, expected: int) -> str:
    """The diagnostics of an OperationOutcome answer with status ``expected``."""
    assert status == expected, (status, body[:300])
    assert content_type.startswith("application/fhir+json"), content_type
    document = orjson.loads(body)
    assert document["resourceType"] == "OperationOutcome", document
    issue = document["issue"][0]
    assert issue["severity"] == "error", document
    return str(issue["diagnostics"])
