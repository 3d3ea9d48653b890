"""Shared pieces of the benchmarks: processes, ports, HTTP, percentiles, results."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
EXPORTSVC = str(Path(sys.executable).with_name("exportsvc"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env(data_dir: Path, **settings: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTSVC_")}
    base["EXPORTSVC_DATA_DIR"] = str(data_dir)
    base["EXPORTSVC_AUTH"] = "off"
    base.update({f"EXPORTSVC_{k.upper()}": v for k, v in settings.items()})
    return base


def seed(data_dir: Path, patients: int) -> str:
    out = subprocess.run(
        [EXPORTSVC, "seed", "--patients", str(patients)],
        env=env(data_dir),
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def get(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response
    except urllib.error.HTTPError as error:
        return error.code, error


def wait_listening(port: int, deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine() -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    return path


# -- shared by bench/run.py and its scenarios ------------------------------------------

MB = 1_000_000
ROOT = Path(__file__).resolve().parent.parent
EXPORT_HEADERS = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
POLL_CAP_SECONDS = 0.05


def http_json(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON body or None) of one request; errors are answers."""
    data = json.dumps(body).encode() if body is not None else None
    all_headers = {"Accept": "application/fhir+json", **(headers or {})}
    if data is not None:
        all_headers.setdefault("Content-Type", "application/fhir+json")
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, head, raw = error.code, dict(error.headers), error.read()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")[:500]
    return status, head, parsed


def poll_until_done(status_url: str, deadline_s: float = 3600) -> dict[str, Any]:
    """Poll a status URL (Retry-After, capped) until it answers 200; the manifest."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status, headers, body = http_json(status_url)
        if status == 200:
            return dict(body)
        if status != 202:
            raise RuntimeError(f"{status_url} answered {status}: {body}")
        time.sleep(min(float(headers.get("Retry-After", "1")), POLL_CAP_SECONDS))
    raise RuntimeError(f"{status_url} did not finish within {deadline_s}s")


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as children:
                for child in children.read().split():
                    found += [int(child), *descendants(int(child))]
        except OSError:
            continue
    return found


class Service:
    """``exportsvc serve`` as a subprocess on a free port of 127.0.0.1; a context manager.

    While it runs, a thread samples (every 20 ms) the RSS of the process and its
    descendants; :attr:`peak_rss_kib` is the largest of those samples and the process's
    own VmHWM, :attr:`peak_anon_kib` the largest sampled anonymous part.
    Stopping ends exactly this process (SIGTERM, then SIGKILL) by its pid.
    """

    def __init__(self, data_dir: Path, log: Path, *extra: str, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [EXPORTSVC, "serve", "--port", str(self.port), *extra],
            env=env(data_dir, **settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
        )
        self._sampled = 0
        self._anon = 0
        self._hwm = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        try:
            wait_listening(self.port)
        except BaseException:
            self.stop()
            raise

    def _sample(self) -> None:
        while not self._stop.is_set() and self.process.poll() is None:
            pids = [self.process.pid, *descendants(self.process.pid)]
            self._sampled = max(self._sampled, sum(proc_status_kib(p, "VmRSS") for p in pids))
            self._anon = max(self._anon, sum(proc_status_kib(p, "RssAnon") for p in pids))
            self._hwm = max(self._hwm, proc_status_kib(self.process.pid, "VmHWM"))
            self._stop.wait(0.02)

    def rss_kib(self) -> int:
        return proc_status_kib(self.process.pid, "VmRSS")

    @property
    def peak_rss_kib(self) -> int:
        return max(self._sampled, self._hwm, proc_status_kib(self.process.pid, "VmHWM"))

    @property
    def peak_anon_kib(self) -> int:
        """The largest sampled anonymous RSS (heap; without mapped files such as SQLite's
        mmap, which VmRSS counts too)."""
        return self._anon

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; the exit code."""
        self._hwm = max(self._hwm, proc_status_kib(self.process.pid, "VmHWM"))
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._stop.set()
        self._sampler.join()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_cli(data_dir: Path, *args: str, **settings: str) -> str:
    """Run ``exportsvc ARGS`` to completion with these settings; its stdout."""
    done = subprocess.run(
        [EXPORTSVC, *args], env=env(data_dir, **settings), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"exportsvc {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout.strip()


def measured(resources: int, nbytes: int, seconds: float, **extra: Any) -> dict[str, Any]:
    """One measurement: counts, wall time and the two rates."""
    return {
        "resources": resources,
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "resources_per_s": round(resources / seconds) if seconds > 0 else None,
        "mb_per_s": round(nbytes / MB / seconds, 1) if seconds > 0 else None,
        **extra,
    }
