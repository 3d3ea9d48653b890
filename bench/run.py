"""Benchmarks of issue 7: seed a store, run each scenario, print a table, write JSON.

    .venv/bin/python bench/run.py --size 100000 [--scenarios export import ...] [--out DIR]

Scenarios (``--scenarios`` takes names or the groups ``ideal``, ``export``, ``import``;
what a chosen scenario needs runs too): the ideal loops (a) ``ideal_fs`` and
``ideal_fs_postgres``, (b) ``ideal_azure`` and ``ideal_azure_sequential``, each also
with Content-MD5 (``ideal_azure_md5``, ``ideal_azure_sequential_md5``), (c)
``ideal_import_sqlite`` and ``ideal_import_postgres``; then ``export_fs``,
``export_postgres``, ``export_azure``, ``kickoff`` (a store
of ``--kickoff-size``, 400k by default), ``import_sqlite``, ``import_postgres``,
``memory`` (peak RSS against a ``--memory-reference-size`` run), ``drain`` and
``scale``. The result goes to ``OUT/<date>-<size>.json`` (default ``bench/results``).
A scenario that fails is recorded with its error and the others still run; the exit
status is 1 then. Missed targets are reported, never an error: this is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, machine
from context import Context, Unavailable, patients_for
from scenarios import SCENARIOS, expand


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run(ctx: Context, names: list[str]) -> bool:
    """Run the scenarios in order; False when one of them failed."""
    ok = True
    for name in names:
        function, needs = SCENARIOS[name]
        missing = [n for n in needs if ctx.results.get(n, {}).get("status") != "ok"]
        started = time.perf_counter()
        print(f"{name} ...", end=" ", flush=True)
        try:
            if missing:
                raise Unavailable(f"needs {', '.join(missing)}")
            result = {"status": "ok", **function(ctx)}
        except Unavailable as exc:
            result = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:
            ok = False
            result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        result["scenario_seconds"] = round(time.perf_counter() - started, 1)
        ctx.results[name] = result
        print(f"{result['status']} ({result['scenario_seconds']}s)", flush=True)
    return ok


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    if isinstance(value, int | float):
        return f"{value:,.0f}"
    return str(value)


def table(results: dict[str, dict[str, Any]]) -> str:
    """Two Markdown tables: the measurements, then every target."""
    head = "| scenario | resources | MB | s | resources/s | MB/s | peak RSS MB | anon MB | ratio |"
    lines = [head, "|" + " --- |" * 9]
    for name, r in results.items():
        if "resources" not in r:
            continue
        lines.append(
            f"| {name} | {_fmt(r['resources'])} | {_fmt(r['bytes'] / 1e6, 1)} "
            f"| {_fmt(r['seconds'], 2)} | {_fmt(r['resources_per_s'])} "
            f"| {_fmt(r['mb_per_s'], 1)} | {_fmt(r.get('peak_rss_mb'), 1)} "
            f"| {_fmt(r.get('peak_anon_mb'), 1)} "
            f"| {_fmt(r.get('ratio'), 2)} |"
        )
    pairs = [
        f"- {name} against {loop}: "
        + ", ".join(f"{p['loop_seconds']:.2f}/{p['seconds']:.2f} = {p['ratio']:.2f}" for p in runs)
        + f" (median {r['paired_ratio'][loop]:.2f})"
        for name, r in results.items()
        for loop, runs in r.get("pairs", {}).items()
    ]
    if pairs:
        lines += ["", "Each round's loop and service run side by side (loop s / service s):"]
        lines += pairs
    lines += ["", "| scenario | target | value | wanted | met |", "|" + " --- |" * 5]
    for name, r in results.items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} | {r.get('reason') or r.get('error')} | | |")
        for t in r.get("targets", []):
            value = t["value"] if not isinstance(t["value"], float) else round(t["value"], 3)
            met = "yes" if t["met"] else "**no**"
            lines.append(
                f"| {name} | {t['metric']} | {_fmt(value, 3)} | {t['op']} {t['target']} | {met} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000, help="resources (about)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds per measurement: best of them, and the median of the service's ratios "
        "to a loop run beside each (default 3 up to 1M resources, 1 above)",
    )
    parser.add_argument("--kickoff-size", type=int, default=400_000)
    parser.add_argument("--memory-reference-size", type=int, default=100_000)
    parser.add_argument("--drain-trials", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="temp folder parent")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an EXPORTSVC_ setting for the service, e.g. block_bytes=8388608 (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.size <= 1_000_000 else 1
    settings = dict(s.split("=", 1) for s in args.setting)
    names = expand(args.scenarios)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before the run: other work skews it")
    with tempfile.TemporaryDirectory(prefix="exportsvc-bench-", dir=args.work) as tmp:
        ctx = Context(
            size=args.size,
            work=Path(tmp),
            repeat=args.repeat,
            kickoff_size=args.kickoff_size,
            memory_reference_size=args.memory_reference_size,
            drain_trials=args.drain_trials,
            settings=settings,
        )
        try:
            seeded = ctx.seed_note(args.size)
            print(seeded, flush=True)
            ok = run(ctx, names)
        finally:
            ctx.close()
    document = {
        "machine": machine() | {"cpu": _cpu_model()},
        "git": _git(),
        "started": started.isoformat(),
        "size": args.size,
        "patients": patients_for(args.size),
        "resources": ctx.results.get("ideal_fs", {}).get("resources"),
        "settings": settings or "defaults",
        "repeat": args.repeat,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "scenarios": ctx.results,
        "seeded": seeded,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started:%Y-%m-%d}-{args.size}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print()
    print(f"{args.size:,} resources asked; machine: {document['machine']}")
    print(table(ctx.results))
    print(f"\nwrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
