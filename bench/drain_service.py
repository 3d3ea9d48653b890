"""Drain time through the public surface: SIGTERM to `exportsvc serve` mid-job, to exit.

An export trial copies a seeded store and kicks off a system export; an import trial
starts on a fresh empty store and imports ndjson files (``file://`` inside
``EXPORTSVC_IMPORT_ROOT``). Each waits until the job has made progress (``/_admin/jobs``)
plus a random delay of up to 0.1 s, sends SIGTERM and measures until the process is gone. Then it
starts the service again on the same data: the job must carry no failure, and once it
has run to the end its manifest must count every resource exactly once (nothing lost,
nothing written twice). Nothing here reads the job tables.

    .venv/bin/python bench/drain_service.py [--kind import] [--trials 10] [--patients 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from common import (
    EXPORT_HEADERS,
    Service,
    http_json,
    percentile,
    poll_until_done,
    seed,
    write_result,
)
from ideal_export import scan_to_files
from measure import import_body

PROGRESS_SECONDS = 30


def _job(service: Service, job_id: str) -> dict[str, Any]:
    status, _, body = http_json(f"{service.url}/_admin/jobs/{job_id}")
    if status != 200:
        raise RuntimeError(f"/_admin/jobs/{job_id} answered {status}: {body}")
    return dict(body)


def _kick_off(service: Service, kind: str, inputs: Path | None) -> str:
    if kind == "export":
        _, headers, body = http_json(f"{service.url}/$export", headers=EXPORT_HEADERS)
    else:
        assert inputs is not None
        _, headers, body = http_json(
            f"{service.url}/$import",
            method="POST",
            body=import_body(sorted(inputs.glob("*.ndjson"))),
            headers={"Prefer": "respond-async"},
        )
    if "Content-Location" not in headers:
        raise RuntimeError(f"{kind} kick-off refused: {body}")
    return str(headers["Content-Location"])


def _progress(job: dict[str, Any]) -> int:
    return int(job.get("resourcesDone") or 0) + int(job.get("linesRead") or 0)


def trial(
    kind: str,
    source: Path,
    work: Path,
    rng: random.Random,
    expected: int,
    settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One drain: ``source`` is a seeded data dir (export) or the ndjson folder (import);
    ``expected`` the resources the finished job must count."""
    data = work / "data"
    settings = dict(settings or {})
    if kind == "export":
        shutil.copytree(source, data)
    else:
        data.mkdir()
        settings["import_root"] = str(source)
    log = work / "serve.log"
    with Service(data, log, **settings) as service:
        status_url = _kick_off(service, kind, source if kind == "import" else None)
        job_id = status_url.rsplit("/", 1)[1]
        deadline = time.monotonic() + PROGRESS_SECONDS
        while time.monotonic() < deadline:
            job = _job(service, job_id)
            if _progress(job) or job["status"] == "completed":
                break
            time.sleep(0.01)
        # Up to 0.1 s: a 100k export is done some 0.15 s after its first checkpoint, and
        # with up to 0.5 s most export trials ended before the signal.
        time.sleep(rng.uniform(0, 0.1))
        started = time.monotonic()
        code = service.stop(timeout=60)
        seconds = time.monotonic() - started
    with Service(data, log, **settings) as service:
        after = _job(service, job_id)
        manifest = poll_until_done(service.url + urllib.parse.urlsplit(status_url).path)
        final = _job(service, job_id)
    shutil.rmtree(data)
    return {
        "seconds": round(seconds, 3),
        "exit_code": code,
        "status": after["status"],
        "progress_at_exit": _progress(after),
        "failure_count": final["failureCount"],
        "restart_count": final["restartCount"],
        "resources": sum(o["count"] for o in manifest["output"]),
        "expected": expected,
    }


def summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    times = [float(t["seconds"]) for t in trials]
    bad = [
        t
        for t in trials
        if t["exit_code"] != 0
        or t["failure_count"] != 0
        or t["resources"] != t["expected"]
        or t["status"] in ("failed", "retriable")
    ]
    return {
        "trials": len(trials),
        "finished_before_signal": sum(t["status"] == "completed" for t in trials),
        "bad": bad,
        "p50_s": percentile(times, 50),
        "p99_s": percentile(times, 99),
        "max_s": max(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["export", "import"], default="export")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        seeded, inputs = Path(tmp) / "seeded", Path(tmp) / "inputs"
        print(seed(seeded, args.patients))
        expected, _ = scan_to_files(seeded / "exportsvc.sqlite3", inputs)
        source = seeded if args.kind == "export" else inputs
        trials = []
        for n in range(args.trials):
            work = Path(tmp) / f"trial-{n}"
            work.mkdir()
            trials.append(trial(args.kind, source, work, rng, expected))
            print(f"trial {n + 1:>2}: {trials[-1]}")
    result = summary(trials)
    print(json.dumps(result, indent=2))
    path = write_result(
        f"drain-{args.kind}-service",
        {"settings": "defaults", "patients": args.patients, "summary": result, "trials": trials},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
