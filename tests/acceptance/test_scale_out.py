"""Scale-out on PostgreSQL: the API and three `exportsvc worker` processes share one
database; a system export of 200k+ resources fans out into work items; one worker is
killed with SIGKILL midway; every worker ran some item; the export validates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.postgres import PostgresCluster

from .conftest import exportsvc_command, free_port, http

pytestmark = pytest.mark.acceptance
PATIENTS = 3700  # about 205k resources


def logged_jobs(log: Path, event: str, also: str = "") -> set[str]:
    """The jobs of the log lines with ``event`` (and ``also``, when given)."""
    jobs = set()
    for line in log.read_text(errors="replace").splitlines():
        if f" {event} " in line and also in line:
            jobs.add(line.split(" job=", 1)[1].split(" ", 1)[0])
    return jobs


def started_items(log: Path) -> set[str]:
    return logged_jobs(log, "job.started", also="pages_read=")  # an export item's start


def unfinished_items(log: Path) -> set[str]:
    return started_items(log) - logged_jobs(log, "job.completed")


def wait(condition: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:  # end exactly what this test started
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def test_three_workers_share_a_fanned_out_export(
    postgres: PostgresCluster, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    dsn = postgres.create_database("scaleout")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTSVC_")}
    env |= {
        "EXPORTSVC_DATABASE_URL": dsn,
        "EXPORTSVC_DATA_DIR": str(tmp_path / "data"),
        "EXPORTSVC_AUTH": "off",
        "EXPORTSVC_SECRET_KEY": "c2NhbGUtb3V0LXRlc3Qta2V5LTAxMjM0NTY3ODkwMTI=",
        "EXPORTSVC_EXPORT_ITEM_RESOURCES": "12000",
        "EXPORTSVC_LEASE_SECONDS": "2",
        "EXPORTSVC_POLL_INTERVAL_SECONDS": "0.2",
        "EXPORTSVC_WORKER_CONCURRENCY": "1",
        "EXPORTSVC_PAGE_SIZE": "1000",
    }
    command = exportsvc_command()
    subprocess.run([*command, "migrate"], env=env, check=True, capture_output=True, timeout=60)
    seeded = subprocess.run(
        [*command, "seed", "--patients", str(PATIENTS)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "seeded" in seeded.stdout
    port = free_port()
    with (tmp_path / "api.log").open("wb") as api_log:
        processes.append(
            subprocess.Popen(
                [*command, "serve", "--port", str(port), "--no-worker"],
                env=env,
                stdout=api_log,
                stderr=api_log,
            )
        )
    base = f"http://127.0.0.1:{port}"
    wait(lambda: _answers(base), "the API", 30)
    logs = [tmp_path / f"worker-{n}.log" for n in range(3)]
    workers = []
    for log in logs:
        with log.open("wb") as out:
            workers.append(subprocess.Popen([*command, "worker"], env=env, stdout=out, stderr=out))
    processes.extend(workers)

    kickoff = http("GET", f"{base}/$export", headers={"Prefer": "respond-async"})
    assert kickoff.status == 202
    status_url = kickoff.headers["Content-Location"]
    job_id = status_url.rsplit("/", 1)[1]
    # Every worker has started an item: kill one while it is in the middle of its work.
    wait(lambda: all(started_items(log) for log in logs), "every worker to start an item", 60)
    # The victim is killed with an item in hand (one it finished needs no taking over).
    wait(lambda: unfinished_items(logs[1]), "the victim to hold an unfinished item", 60)
    victim = workers[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    held = unfinished_items(logs[1])

    deadline = time.monotonic() + 180
    while (response := http("GET", status_url)).status == 202:
        assert time.monotonic() < deadline, "the export did not finish"
        time.sleep(0.2)
    assert response.status == 200, response.body[:500]
    manifest = json.loads(response.body)
    total = sum(f["count"] for f in manifest["output"])
    assert total > 200_000

    job = json.loads(http("GET", f"{base}/_admin/jobs/{job_id}").body)
    assert job["items"] > 15 and job["itemsDone"] == job["items"]
    for log in logs:
        assert started_items(log), f"{log.name} ran no work item"
    survivors = started_items(logs[0]) | started_items(logs[2])
    assert held & survivors or job["restartCount"] >= 1, (
        "the killed worker's item was not taken over"
    )
    result = subprocess.run(
        [*command, "validate", job_id], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _answers(base: str) -> bool:
    try:
        return http("GET", f"{base}/metadata").status == 200
    except OSError:
        return False
