"""Acceptance fixtures: a seeded data dir and ``exportsvc serve`` running as a subprocess.

Nothing here imports the service: the tests see it the way a client does, over HTTP,
plus its CLI (``exportsvc validate``) and, read-only, the SQLite store it serves from.
A failing test gets the server's stderr attached as a report section.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from tests.postgres import PostgresCluster

PATIENTS = 60
LARGE_PATIENTS = 1000  # resilience tests: exports that last seconds at small page sizes
SEED = 11
MAX_FILE_BYTES = 100_000  # small, so Observation rolls over into several files
STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0
POLL_SECONDS = 30.0
RETRY_AFTER_CAP = 2.0  # honour Retry-After, but never wait longer than this per poll
ASYNC_HEADERS = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
T = TypeVar("T")


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
    env["EXPORTSVC_AUTH"] = "off"  # these tests drive the API without tokens
    env["EXPORTSVC_MAX_FILE_BYTES"] = str(MAX_FILE_BYTES)
    env["EXPORTSVC_POLL_INTERVAL_SECONDS"] = "0.2"
    env.update({f"EXPORTSVC_{name.upper()}": value for name, value in settings.items()})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def job_id_of(status_url: str) -> str:
    """The job id at the end of a status URL (``.../_operations/export/{id}``)."""
    return status_url.rstrip("/").rsplit("/", 1)[-1]


def wait_until(
    condition: Callable[[], T | None],
    what: str | Callable[[], str],
    timeout: float,
    interval: float = 0.02,
) -> T:
    """Poll ``condition`` until it returns something truthy (returned); fail at the deadline.

    ``what`` describes the awaited condition for the failure message (a callable is
    evaluated only then, e.g. to show the latest state).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout}s waiting for: {what() if callable(what) else what}"
            )
        time.sleep(interval)


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

    def version_counts(self) -> dict[Key, int]:
        """(type, id) → how many versions the store holds."""
        rows = self._query("SELECT type, id, count(*) FROM resources GROUP BY type, id")
        return {(t, i): n for t, i, n in rows}

    def write_locked(self) -> bool:
        """Whether another process holds the database's write lock right now.

        A probe: it takes the lock for an instant if it is free and writes nothing.
        """
        with closing(sqlite3.connect(self.path, timeout=0, isolation_level=None)) as db:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc):
                    return True
                raise
            db.execute("ROLLBACK")
            return False

    _JOB_COLUMNS = (
        "id",
        "parent_id",
        "status",
        "lease_owner",
        "lease_version",
        "lease_expires",
        "restart_count",
        "cancel_requested",
        "pause_requested",
    )

    def _jobs(self, where: str, *params: object) -> dict[str, dict[str, Any]]:
        rows = self._query(
            f"SELECT {', '.join(self._JOB_COLUMNS)}, record FROM jobs WHERE {where} "
            "ORDER BY created_at",
            *params,
        )
        found = {}
        for row in rows:
            job = dict(zip(self._JOB_COLUMNS, row[:-1], strict=True))
            job["record"] = json.loads(row[-1])
            found[job["id"]] = job
        return found

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's row as stored: the control columns plus its record (``record``)."""
        rows = self._jobs("id = ?", job_id)
        assert rows, f"no job {job_id!r} in {self.path}"
        return rows[job_id]

    def units(self, job_id: str) -> dict[str, dict[str, Any]]:
        """The rows of a job and of its work items (``parent_id``), by id, oldest first."""
        return self._jobs("id = ? OR parent_id = ?", job_id, job_id)


# -- service logs ------------------------------------------------------------------------

_FIELD = re.compile(r"(\w+)=(.*?)(?= \w+=|$)")
_STAMP = re.compile(r"\d{4}-\d\d-\d\d")


@dataclass(frozen=True)
class LogEvent:
    """One ``date time LEVEL logger event key=value ...`` line of a service log."""

    source: str  # which process wrote it
    line_no: int
    level: str
    logger: str
    event: str
    fields: dict[str, str]
    line: str

    def number(self, key: str) -> int:
        return int(self.fields[key])

    def __str__(self) -> str:
        return f"[{self.source}:{self.line_no}] {self.line}"


def parse_log_line(line: str, source: str, line_no: int) -> LogEvent | None:
    parts = line.split(" ", 5)
    if len(parts) < 5 or not _STAMP.fullmatch(parts[0]):
        return None  # a traceback or other continuation line
    fields = dict(_FIELD.findall(parts[5])) if len(parts) > 5 else {}
    return LogEvent(source, line_no, parts[2], parts[3], parts[4], fields, line)


class LogFile:
    """A process's stderr log, parsed incrementally as it grows."""

    def __init__(self, path: Path, source: str) -> None:
        self.path, self.source = path, source
        self._offset, self._partial, self._lines = 0, b"", 0
        self._events: list[LogEvent] = []

    def _read_new(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            self._lines += 1
            event = parse_log_line(raw.decode(errors="replace"), self.source, self._lines)
            if event is not None:
                self._events.append(event)

    def events(
        self,
        event: str | None = None,
        where: Callable[[LogEvent], bool] | None = None,
        **match: str,
    ) -> list[LogEvent]:
        """Complete lines so far, filtered by event name, ``key=value`` fields and ``where``."""
        self._read_new()
        return [
            e
            for e in self._events
            if (event is None or e.event == event)
            and all(e.fields.get(k) == v for k, v in match.items())
            and (where is None or where(e))
        ]

    def wait_for(
        self,
        event: str,
        where: Callable[[LogEvent], bool] | None = None,
        *,
        process: subprocess.Popen[bytes] | None = None,
        timeout: float = 30.0,
        **match: str,
    ) -> LogEvent:
        """The first matching event; fails at the deadline or if ``process`` exits first."""

        def found() -> LogEvent | None:
            hits = self.events(event, where, **match)
            if hits:
                return hits[0]
            if process is not None and process.poll() is not None:
                hits = self.events(event, where, **match)  # lines written before the exit
                if hits:
                    return hits[0]
                pytest.fail(
                    f"{self.source} exited {process.returncode} before logging {event} "
                    f"{match or ''}:\n{self.tail()}"
                )
            return None

        return wait_until(found, lambda: f"{event} {match or ''} in {self.source}", timeout)

    def tail(self, last_lines: int = 200) -> str:
        if not self.path.exists():
            return ""
        lines = self.path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-last_lines:])


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
    log: LogFile = field(init=False)
    max_file_bytes: int = MAX_FILE_BYTES

    def __post_init__(self) -> None:
        self.store = Store(self.data_dir / "exportsvc.sqlite3")
        self.log = LogFile(self.stderr_path, f"serve {self.base_url}")
        self.max_file_bytes = int(self.env.get("EXPORTSVC_MAX_FILE_BYTES", MAX_FILE_BYTES))

    def url(self, path: str) -> str:
        return self.base_url + path

    def rebase(self, url: str) -> str:
        """``url`` (of an earlier server on the same data dir) on this server."""
        parts = urllib.parse.urlsplit(url)
        return self.url(parts.path + (f"?{parts.query}" if parts.query else ""))

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

    def admin_job(self, job_id: str) -> dict[str, Any]:
        """``GET /_admin/jobs/{id}`` (loopback: no token needed)."""
        response = self.request("GET", f"/_admin/jobs/{job_id}")
        assert response.status == 200, (response.status, response.body[:500])
        job: dict[str, Any] = response.json()
        return job

    def wait_job(
        self, job_id: str, condition: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        """Poll the admin view of a job until ``condition`` holds; return that view."""
        seen: list[dict[str, Any]] = []

        def check() -> dict[str, Any] | None:
            seen[:] = [self.admin_job(job_id)]
            return seen[0] if condition(seen[0]) else None

        return wait_until(check, lambda: f"a condition on job {job_id}; last {seen}", timeout)

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


def seed(data_dir: Path, patients: int = PATIENTS) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [*exportsvc_command(), "seed", "--patients", str(patients), "--seed", str(SEED)],
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


def start_server(data_dir: Path, with_worker: bool = True, /, **settings: str) -> LiveServer:
    """``exportsvc serve`` on ``data_dir``; ``with_worker=False``: ``--no-worker``."""
    port = free_port()
    env = service_env(data_dir, **settings)
    logs = data_dir.parent / f"{data_dir.name}-logs-{port}"
    logs.mkdir()
    stdout_path, stderr_path = logs / "stdout.txt", logs / "stderr.txt"
    command = [*exportsvc_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if not with_worker:
        command.append("--no-worker")
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command,
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


@pytest.fixture(scope="session")
def large_seeded_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``LARGE_PATIENTS`` patients, seeded once per session; copy it before use."""
    template = tmp_path_factory.mktemp("seeded-large") / "data"
    seed(template, LARGE_PATIENTS)
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

    Without ``data_dir`` a fresh copy of the seeded data is used. ``api_only(...)`` starts
    ``serve --no-worker`` the same way (run ``exportsvc worker`` processes beside it).
    """

    def __init__(self, template: Path, workdir: Path) -> None:
        self.template, self.workdir = template, workdir
        self.servers: list[LiveServer] = []

    def __call__(self, data_dir: Path | None = None, /, **settings: str) -> LiveServer:
        return self._start(data_dir, True, settings)

    def api_only(self, data_dir: Path | None = None, /, **settings: str) -> LiveServer:
        return self._start(data_dir, False, settings)

    def _start(
        self, data_dir: Path | None, with_worker: bool, settings: Mapping[str, str]
    ) -> LiveServer:
        if data_dir is None:
            data_dir = self.workdir / f"data-{len(self.servers)}"
            shutil.copytree(self.template, data_dir)
        server = start_server(data_dir, with_worker, **settings)
        self.servers.append(server)
        return server


@pytest.fixture
def start_exportsvc(seeded_template: Path, tmp_path: Path) -> Iterator[ServerFactory]:
    """Every server still running at teardown gets SIGTERM and must exit 0."""
    factory = ServerFactory(seeded_template, tmp_path)
    yield factory
    for server in factory.servers:
        stop_and_check(server)


# -- worker processes (``exportsvc worker``: no API) --------------------------------------


@dataclass
class LiveWorker:
    """An ``exportsvc worker`` on a server's data dir and settings, with its own log."""

    name: str
    process: subprocess.Popen[bytes]
    stderr_path: Path
    log: LogFile = field(init=False)

    def __post_init__(self) -> None:
        self.log = LogFile(self.stderr_path, self.name)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def state(self) -> str:
        """The process state letter from ``/proc`` (``T``: stopped); ``""`` once gone."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return ""
        return stat.rsplit(")", 1)[1].split()[0]

    def wait_for(
        self,
        event: str,
        where: Callable[[LogEvent], bool] | None = None,
        *,
        timeout: float = 30.0,
        **match: str,
    ) -> LogEvent:
        """The first ``event`` in this worker's log; fails if the worker exits first."""
        return self.log.wait_for(event, where, process=self.process, timeout=timeout, **match)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to this worker's process (by its pid), if it still runs."""
        if self.running:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """``kill -9`` and reap."""
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_SECONDS)

    def stop(self, timeout: float = STOP_SECONDS) -> int:
        """SIGTERM (drain), wait up to ``timeout``, then SIGKILL and fail."""
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout}s and was "
                f"killed; stderr:\n{self.stderr()}"
            )
        return self.process.returncode

    def stderr(self, last_lines: int = 200) -> str:
        return self.log.tail(last_lines)


class WorkerFactory:
    """Starts ``exportsvc worker`` processes beside a server: ``start(server, **settings)``.

    Each worker gets the server's environment (same data dir and settings, plus
    ``settings``) and its own stderr log. Whatever still runs at teardown is continued
    (if stopped) and killed, by pid.
    """

    def __init__(self) -> None:
        self.workers: list[LiveWorker] = []

    def __call__(self, server: LiveServer, **settings: str) -> LiveWorker:
        env = dict(server.env)
        env.update({f"EXPORTSVC_{name.upper()}": value for name, value in settings.items()})
        name = f"worker-{len(self.workers) + 1}"
        logs = server.stderr_path.parent
        stderr_path = logs / f"{name}.stderr.txt"
        with (logs / f"{name}.stdout.txt").open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [*exportsvc_command(), "worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        worker = LiveWorker(f"{name} (pid {process.pid})", process, stderr_path)
        self.workers.append(worker)
        return worker

    def cleanup(self) -> None:
        for worker in self.workers:
            if worker.running:
                worker.signal(signal.SIGCONT)
                worker.kill()


@pytest.fixture
def start_worker() -> Iterator[WorkerFactory]:
    factory = WorkerFactory()
    yield factory
    factory.cleanup()


WORKER_LOG_LINES = 60  # per worker in a failure report: a crash test starts dozens


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the stderr of every server and worker a failed test used to its report."""
    report = yield
    if report.failed:
        servers: list[LiveServer] = []
        workers: list[LiveWorker] = []
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, LiveServer):
                servers.append(value)
            elif isinstance(value, ServerFactory):
                servers.extend(value.servers)
            elif isinstance(value, WorkerFactory):
                workers.extend(value.workers)
        for server in servers:
            report.sections.append((f"exportsvc stderr ({server.base_url})", server.stderr()))
        for worker in workers:
            report.sections.append(
                (f"exportsvc {worker.name} stderr", worker.stderr(WORKER_LOG_LINES))
            )
    return report


# -- more backends: seeded SQLite templates of any size, PostgreSQL ------------------------


class SeededTemplates:
    """Seeded data dirs by patient count, each seeded once per session: ``templates(n)``.

    A template is shared: copy it before use (``shutil.copytree``).
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._factory = tmp_path_factory
        self._made: dict[int, Path] = {}

    def __call__(self, patients: int) -> Path:
        if patients not in self._made:
            template = self._factory.mktemp(f"seeded-{patients}") / "data"
            seed(template, patients)
            self._made[patients] = template
        return self._made[patients]


@pytest.fixture(scope="session")
def seeded_templates(tmp_path_factory: pytest.TempPathFactory) -> SeededTemplates:
    return SeededTemplates(tmp_path_factory)


# Every process of a test on PostgreSQL must decrypt the same destination secrets, and
# the default key file lives in each process's data dir: give them all one key.
POSTGRES_SECRET_KEY = base64.urlsafe_b64encode(b"acceptance-tests-on-postgresql!!").decode()


def postgres_settings(dsn: str) -> dict[str, str]:
    """Settings (for ``start_exportsvc``, ``start_worker``...) that put both stores in ``dsn``."""
    return {"database_url": dsn, "secret_key": POSTGRES_SECRET_KEY}


def postgres_fetch(dsn: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """One statement on its own connection (asyncpg, ``$1`` placeholders); the rows."""

    async def fetch() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql, *params)]
        finally:
            await connection.close()

    return asyncio.run(fetch())


@dataclass(frozen=True)
class PostgresStore(Store):
    """:class:`Store`, read from a PostgreSQL database (``dsn``; ``path`` names nothing).

    Put it on a server started with :func:`postgres_settings`: ``server.store = ...``.
    """

    dsn: str = ""

    @classmethod
    def of(cls, dsn: str) -> PostgresStore:
        return cls(Path(os.devnull), dsn)

    def _query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        numbers = iter(range(1, len(params) + 1))
        return postgres_fetch(self.dsn, re.sub(r"\?", lambda _: f"${next(numbers)}", sql), *params)

    def current(self, types: Iterable[str] | None = None) -> dict[Key, bytes]:
        wanted = set(types) if types is not None else None
        rows = self._query(
            "SELECT type, id, raw FROM resources "
            "WHERE next_seq IS NULL AND NOT deleted AND raw IS NOT NULL"
        )
        return {(t, i): bytes(raw) for t, i, raw in rows if wanted is None or t in wanted}

    def write_locked(self) -> bool:
        """Whether another session of the database is inside a transaction or a statement
        right now (holding whatever locks it took): PostgreSQL has no one write lock, and
        a process stopped there would block others on the rows or advisory lock it holds.
        An idle session, such as a worker's LISTEN connection, holds none."""
        rows = self._query(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' AND state <> 'idle'"
        )
        return bool(rows[0][0])


class PostgresDatabases:
    """New databases on the session's cluster, migrated and seeded: ``databases(n)`` → DSN.

    The data of each patient count is seeded once, into a template database; every call
    returns a fresh copy of it (``CREATE DATABASE ... TEMPLATE``), so tests do not share
    a store. ``databases(0)``: migrated and empty.
    """

    def __init__(self, cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.cluster = cluster
        self._factory = tmp_path_factory
        self._templates: set[str] = set()

    def __call__(self, patients: int = 0) -> str:
        template = self._template(patients)
        name = f"t_{uuid.uuid4().hex[:20]}"
        postgres_fetch(self.cluster.dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.cluster.dsn_for(name)

    def _template(self, patients: int) -> str:
        name = f"seeded_{patients}"
        if name in self._templates:
            return name
        dsn = self.cluster.create_database(name)
        data_dir = self._factory.mktemp(name) / "data"
        env = service_env(data_dir, **postgres_settings(dsn))
        commands = [["migrate"]]
        if patients:
            commands.append(["seed", "--patients", str(patients), "--seed", str(SEED)])
        for command in commands:
            done = subprocess.run(
                [*exportsvc_command(), *command],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, f"exportsvc {command[0]}: {done.stdout}{done.stderr}"
        self._templates.add(name)
        return name


@pytest.fixture(scope="session")
def postgres_databases(
    postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> PostgresDatabases:
    return PostgresDatabases(postgres, tmp_path_factory)
