"""Serving the app on a port: the HTTP layer's limits, and FHIR answers to the requests
aiohttp refuses before any handler (or middleware) runs.

aiohttp's parser refuses a request line longer than ``EXPORTSVC_MAX_URL_BYTES``, a header
line longer than ``EXPORTSVC_MAX_HEADER_BYTES``, more than ``EXPORTSVC_MAX_HEADERS``
headers and anything that is not HTTP/1.x. By default it answers with a plain-text body
that quotes the offending bytes and logs them with a traceback: a malformed
``Authorization`` header put the caller's token in the log. Here those requests get a
``414`` / ``431`` / ``400`` OperationOutcome that quotes nothing, and one log line
(``http.bad_request``) with the status and the kind of problem only.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import traceback
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from exportsvc.api.outcome import outcome_response
from exportsvc.settings import Settings

log = logging.getLogger(__name__)


def http_limits(settings: Settings) -> dict[str, Any]:
    """The parser limits, as aiohttp's request handler takes them."""
    return {
        "max_line_size": settings.max_url_bytes,
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
    }


def protocol_error(exc: BaseException | None, settings: Settings) -> tuple[int, str, str]:
    """(status, FHIR issue code, message) for a request the parser refused. The message
    never quotes the request: its bytes may hold a token."""
    if isinstance(exc, LineTooLong):
        # Which limit: the parser was in its URL callback (C parser) or the request line.
        in_url = any(f.name.endswith("cb_on_url") for f in traceback.extract_tb(exc.__traceback__))
        if in_url or "Status line" in str(exc.args[0] if exc.args else ""):
            return 414, "too-long", f"the URL is longer than {settings.max_url_bytes} bytes"
        return 431, "too-long", f"a request header is longer than {settings.max_header_bytes} bytes"
    if isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message:
        return 431, "too-long", f"the request has more than {settings.max_headers} headers"
    return 400, "structure", "the request is not valid HTTP/1.1"


class _Protocol(RequestHandler):
    settings: Settings

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp's: the response has begun
            raise ConnectionError("the response was sent already; the connection is closed")
        if isinstance(exc, HttpProcessingError):
            status, code, text = protocol_error(exc, self.settings)
            log.info(
                "http.bad_request",
                extra={"status": status, "problem": type(exc).__name__, "remote": request.remote},
            )
        else:
            log.error("http.unhandled", extra={"problem": type(exc).__name__ if exc else None})
            status, code, text = 500, "exception", "internal server error"
        response = outcome_response(status, text, code=code)
        response.force_close()
        return response


class ServiceRunner(web.AppRunner):
    """An ``AppRunner`` with the service's HTTP limits whose connections answer protocol
    errors with OperationOutcomes (see the module docstring)."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, **http_limits(settings), **kwargs)
        self.settings = settings

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no hook for the protocol class: the server (the protocol factory
        # the sites listen with) becomes one that makes ours.
        server.__class__ = _Server
        cast(_Server, server).settings = self.settings
        return server


class _Server(web.Server):
    settings: Settings

    def __call__(self) -> RequestHandler:
        protocol = _Protocol(self, loop=self._loop, **self._kwargs)
        protocol.settings = self.settings
        return protocol


async def serve(
    app: web.Application,
    settings: Settings,
    host: str,
    port: int,
    *,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down like ``web.run_app``: stop listening,
    give requests ``EXPORTSVC_DRAIN_GRACE_SECONDS``, run the app's cleanup (the worker
    drains there)."""
    runner = ServiceRunner(
        app, settings, access_log=None, shutdown_timeout=settings.drain_grace_seconds
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await web.TCPSite(runner, host, port).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready()
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
