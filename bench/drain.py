"""Drain time: SIGTERM to `exportsvc serve` during an export, until the process is gone.

Each trial copies a seeded store, starts the service with default settings, kicks off a
system export, waits until the job has made progress plus a random delay, sends SIGTERM
and measures until exit. Then it checks the job is `queued` with a checkpoint (drained,
no failure counted). Prints p50/p99/max and writes bench/results/<date>-drain.json.

    .venv/bin/python bench/drain.py [--trials 20] [--patients 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from common import EXPORTSVC, env, free_port, get, percentile, seed, wait_listening, write_result

HEADERS = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


def job_state(data_dir: Path, job_id: str) -> tuple[str, int, int]:
    with sqlite3.connect(data_dir / "exportsvc.sqlite3") as db:
        status, record = db.execute(
            "SELECT status, record FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    parsed = json.loads(record)
    return status, parsed["resources_done"], parsed["failure_count"]


def trial(seeded: Path, work: Path, rng: random.Random) -> dict[str, object]:
    data_dir = work / "data"
    shutil.copytree(seeded, data_dir)
    port = free_port()
    log = (work / "serve.log").open("wb")
    process = subprocess.Popen(
        [EXPORTSVC, "serve", "--port", str(port)], env=env(data_dir), stdout=log, stderr=log
    )
    try:
        wait_listening(port)
        status, response = get(f"http://127.0.0.1:{port}/$export", headers=HEADERS)
        assert status == 202, status
        job_id = response.headers["Content-Location"].rsplit("/", 1)[1]
        deadline = time.monotonic() + 30
        while job_state(data_dir, job_id)[1] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        seconds = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    status_after, done, failures = job_state(data_dir, job_id)
    shutil.rmtree(data_dir)
    return {
        "seconds": round(seconds, 3),
        "exit_code": code,
        "status": status_after,
        "resources_checkpointed": done,
        "failure_count": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        seeded = Path(tmp) / "seeded"
        print(seed(seeded, args.patients))
        trials = []
        for n in range(args.trials):
            work = Path(tmp) / f"trial-{n}"
            work.mkdir()
            result = trial(seeded, work, rng)
            trials.append(result)
            print(f"trial {n + 1:>2}: {result}")
    drained = [t for t in trials if t["status"] == "queued"]
    times = [float(t["seconds"]) for t in trials]
    summary = {
        "trials": len(trials),
        "drained_mid_export": len(drained),
        "finished_before_signal": sum(t["status"] == "completed" for t in trials),
        "bad": [
            t
            for t in trials
            if t["exit_code"] != 0
            or t["failure_count"] != 0
            or t["status"] not in ("queued", "completed")
        ],
        "p50_s": percentile(times, 50),
        "p99_s": percentile(times, 99),
        "max_s": max(times),
    }
    print(json.dumps(summary, indent=2))
    path = write_result(
        "drain",
        {"settings": "defaults", "patients": args.patients, "summary": summary, "trials": trials},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
