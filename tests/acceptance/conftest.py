"""Acceptance fixtures: a seeded data dir and ``exportsvc serve`` running as a subprocess.

Nothing here imports the service: the tests see it the way a client does, over HTTP,
plus its CLI (``exportsvc validate``) and, read-only, the SQLite store it serves from.
A failing test gets the server's stderr attached as a report section.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

PATIENTS = 60
SEED = 11
MAX_FILE_BYTES = 100_000  # small, so Observation rolls over into several files
STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0
POLL_SECONDS = 30.0
RETRY_AFTER_CAP = 2.0  # honour Retry-After, but never wait longer than this per poll
ASYNC_HEADERS = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


def exportsvc_command() -> list[str]:
    """The venv's console script beside this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("exportsvc")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "exportsvc.cli"]


def service_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any EXPORTSVC_* of the caller's, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTSVC_")}
    env["EXPORTSVC_DATA_DIR"] = str(data_dir)
    env["EXPORTSVC_MAX_FILE_BYTES"] = str(MAX_FILE_BYTES)
    env["EXPORTSVC_POLL_INTERVAL_SECONDS"] = "0.2"
    env.update({f"EXPORTSVC_{name.upper()}": value for name, value in settings.items()})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> HttpResponse:
    """One request with urllib; 4xx/5xx are returned, not raised. Closes the response."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpResponse(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return HttpResponse(error.code, error.headers, error.read())


def assert_operation_outcome(response: HttpResponse, status: int) -> dict[str, Any]:
    assert response.status == status, (response.status, response.body[:500])
    assert response.headers.get_content_type() == "application/fhir+json"
    outcome: dict[str, Any] = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"], outcome
    if status >= 400:
        assert outcome["issue"][0]["severity"] in ("error", "fatal"), outcome
    return outcome


# -- the store, read directly ------------------------------------------------------------

Key = tuple[str, str]  # (resourceType, id)


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for name, value in node.items():
            if name == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


@dataclass(frozen=True)
class Store:
    """Read-only view of the seeded SQLite store: the oracle the exports are checked against.

    Compartments are worked out independently of the service's compartment code: a
    resource is in Patient P's compartment if it is P or references ``Patient/P``
    anywhere. For the seeded data this equals the R4 CompartmentDefinition.
    """

    path: Path

    def _query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as db:
            return db.execute(sql, params).fetchall()

    def current(self, types: Iterable[str] | None = None) -> dict[Key, bytes]:
        """Every current, non-deleted resource (of ``types``) → its stored bytes."""
        wanted = set(types) if types is not None else None
        rows = self._query(
            "SELECT type, id, raw FROM resources "
            "WHERE next_seq IS NULL AND deleted = 0 AND raw IS NOT NULL"
        )
        return {(t, i): bytes(raw) for t, i, raw in rows if wanted is None or t in wanted}

    def patient_ids(self) -> list[str]:
        return sorted(id_ for (type_, id_) in self.current(["Patient"]))

    def groups(self) -> dict[str, list[str]]:
        """Group id → the Patient ids its members reference."""
        groups = {}
        for (_, id_), raw in sorted(self.current(["Group"]).items()):
            members = [m["entity"]["reference"] for m in json.loads(raw).get("member", [])]
            groups[id_] = [ref.removeprefix("Patient/") for ref in members]
        return groups

    def compartment(
        self, patients: Iterable[str], types: Iterable[str] | None = None
    ) -> dict[Key, bytes]:
        wanted = {f"Patient/{p}" for p in patients}
        selected = {}
        for key, raw in self.current(types).items():
            refs = set(_references(json.loads(raw)))
            if key[0] == "Patient":
                refs.add(f"Patient/{key[1]}")
            if refs & wanted:
                selected[key] = raw
        return selected


# -- the server process ------------------------------------------------------------------


@dataclass
class LiveServer:
    base_url: str
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    store: Store = field(init=False)
    max_file_bytes: int = MAX_FILE_BYTES

    def __post_init__(self) -> None:
        self.store = Store(self.data_dir / "exportsvc.sqlite3")

    def url(self, path: str) -> str:
        return self.base_url + path

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> HttpResponse:
        url = path_or_url if "://" in path_or_url else self.url(path_or_url)
        return http(method, url, headers=headers, body=body)

    def kick_off(self, method: str, path: str, body: bytes | None = None) -> str:
        """Start an export; return its absolute status URL (the Content-Location)."""
        headers = dict(ASYNC_HEADERS)
        if body is not None:
            headers["Content-Type"] = "application/fhir+json"
        response = self.request(method, path, headers=headers, body=body)
        assert response.status == 202, (response.status, response.body[:500])
        location = response.headers["Content-Location"]
        assert location and location.startswith(self.url("/_operations/export/")), location
        return location

    def wait_for_manifest(self, status_url: str, timeout: float = POLL_SECONDS) -> HttpResponse:
        """Poll ``status_url`` until 200, waiting Retry-After (capped) between polls."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.request("GET", status_url)
            if response.status == 200:
                return response
            assert response.status == 202, (response.status, response.body[:500])
            assert response.headers["X-Progress"], "a 202 status response needs X-Progress"
            retry_after = response.headers["Retry-After"] or ""
            assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
            assert time.monotonic() < deadline, f"{status_url} still running after {timeout}s"
            time.sleep(min(int(retry_after), RETRY_AFTER_CAP))

    def validate(self, job_id: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*exportsvc_command(), "validate", job_id],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def stderr(self, last_lines: int = 200) -> str:
        lines = self.stderr_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-last_lines:])

    def stop(self, timeout: float = STOP_SECONDS) -> int:
        """SIGTERM the process (once), wait up to ``timeout``, then SIGKILL and fail."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                pytest.fail(
                    f"exportsvc (pid {self.process.pid}) ignored SIGTERM for {timeout}s and "
                    f"was killed; stderr:\n{self.stderr()}"
                )
        return self.process.returncode


def seed(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [*exportsvc_command(), "seed", "--patients", str(PATIENTS), "--seed", str(SEED)],
        env=service_env(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _metadata_answers(base_url: str) -> bool:
    try:
        return http("GET", f"{base_url}/metadata", timeout=1.0).status == 200
    except OSError:  # connection refused, reset, timeout: not listening yet
        return False


def start_server(data_dir: Path, **settings: str) -> LiveServer:
    port = free_port()
    env = service_env(data_dir, **settings)
    logs = data_dir.parent / f"{data_dir.name}-logs-{port}"
    logs.mkdir()
    stdout_path, stderr_path = logs / "stdout.txt", logs / "stderr.txt"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [*exportsvc_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    server = LiveServer(
        f"http://127.0.0.1:{port}", data_dir, env, process, stdout_path, stderr_path
    )
    banner = f"exportsvc serving on {server.base_url}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while not (banner in stdout_path.read_text() and _metadata_answers(server.base_url)):
        if process.poll() is not None:
            pytest.fail(f"exportsvc exited {process.returncode} on start:\n{server.stderr()}")
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"exportsvc not listening after {STARTUP_SECONDS}s:\n{server.stderr()}")
        time.sleep(0.05)
    return server


def stop_and_check(server: LiveServer) -> None:
    code = server.stop()
    assert code == 0, f"exportsvc exited {code}; stderr:\n{server.stderr()}"


@pytest.fixture(scope="session")
def seeded_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded once per session; every server gets its own copy of it."""
    template = tmp_path_factory.mktemp("seeded") / "data"
    seed(template)
    return template


@pytest.fixture(scope="module")
def live_server(
    seeded_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One server per test module, on its own copy of the seeded data."""
    data_dir = tmp_path_factory.mktemp("live") / "data"
    shutil.copytree(seeded_template, data_dir)
    server = start_server(data_dir)
    yield server
    stop_and_check(server)


class ServerFactory:
    """Starts servers for one test: ``start(data_dir=None, **settings)``.

    Without ``data_dir`` a fresh copy of the seeded data is used.
    """

    def __init__(self, template: Path, workdir: Path) -> None:
        self.template, self.workdir = template, workdir
        self.servers: list[LiveServer] = []

    def __call__(self, data_dir: Path | None = None, /, **settings: str) -> LiveServer:
        if data_dir is None:
            data_dir = self.workdir / f"data-{len(self.servers)}"
            shutil.copytree(self.template, data_dir)
        server = start_server(data_dir, **settings)
        self.servers.append(server)
        return server


@pytest.fixture
def start_exportsvc(seeded_template: Path, tmp_path: Path) -> Iterator[ServerFactory]:
    """Every server still running at teardown gets SIGTERM and must exit 0."""
    factory = ServerFactory(seeded_template, tmp_path)
    yield factory
    for server in factory.servers:
        stop_and_check(server)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the stderr of every server a failed test used to its report."""
    report = yield
    if report.failed:
        servers: list[LiveServer] = []
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, LiveServer):
                servers.append(value)
            elif isinstance(value, ServerFactory):
                servers.extend(value.servers)
        for server in servers:
            report.sections.append((f"exportsvc stderr ({server.base_url})", server.stderr()))
    return report
