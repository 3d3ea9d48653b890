"""Azurite (the Azure Storage emulator, the npm package in ``node_modules``) for tests.

:class:`Azurite` starts ``azurite-blob`` as a subprocess on a free port of 127.0.0.1,
waits until it accepts connections, and ends exactly the process it started. It can be
stopped and started again on the same port (an outage); with ``persist=True`` the data
lives in a temporary folder and survives the restart, otherwise it is in memory.

Without the emulator the tests that need it are skipped, except under CI (``CI`` set),
where a missing emulator is a failure, not a silent skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# The emulator's well-known development key (public, documented by Microsoft).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary() -> Path:
    """The emulator's launcher; skip the test without it (fail under CI)."""
    if BINARY.exists() and shutil.which("node"):
        return BINARY
    reason = f"Azurite is not installed ({BINARY} or node missing; run `npm ci`)"
    if os.environ.get("CI"):
        raise RuntimeError(reason)
    pytest.skip(reason)


def connection_string(port: int, account_key: str = ACCOUNT_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={account_key};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


class Azurite:
    """One ``azurite-blob`` process; a context manager (sync or async) that starts it."""

    def __init__(self, *, persist: bool = False) -> None:
        self.binary = require_binary()
        self.persist = persist
        self.port = free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="azurite-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    @property
    def blob_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        path = self._workdir / "azurite.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def start(self) -> None:
        """Start the emulator (again, on the same port) and wait until it listens."""
        if self.running:
            return
        command = [
            str(self.binary),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--silent",
        ]
        # --location and --inMemoryPersistence exclude each other (azurite 3.37).
        if self.persist:
            command += ["--location", str(self._workdir / "data")]
        else:
            command.append("--inMemoryPersistence")
        with open(self._workdir / "azurite.log", "ab") as log:
            self._process = subprocess.Popen(
                command, cwd=self._workdir, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self._accepts():
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"azurite-blob exited at startup:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"azurite-blob did not listen within {STARTUP_SECONDS}s")
            time.sleep(0.05)
        if self._process.poll() is not None:  # the port belongs to someone else
            self._process = None
            raise RuntimeError(f"azurite-blob exited at startup:\n{self.log()}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """End the process this object started (by its pid), and reap it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_SECONDS)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Azurite:
        for attempt in range(3):
            try:
                self.start()
                return self
            except RuntimeError:
                if attempt == 2:
                    self.cleanup()
                    raise
                self.port = free_port()  # another process may have taken the port
            except BaseException:
                self.cleanup()
                raise
        raise AssertionError("unreachable")

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    async def __aenter__(self) -> Azurite:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.cleanup)
