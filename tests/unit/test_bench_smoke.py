"""The benchmarks run once at a tiny size, so they cannot rot (no speed is asserted).

``bench/run.py`` runs as a subprocess with every scenario, a store of a few hundred
resources, two rounds per measurement and a temporary results folder; the test checks
only that it wrote a well-formed result with every scenario in it, each ``ok`` (Azurite
and PostgreSQL may be ``skipped`` where they are not installed, but not under CI), and
that each ratio is the median of its rounds' paired runs. ``bench/store_writes.py``
(the store's write path alone) runs too. A measurement on PostgreSQL drops its database
when it ends.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import asyncpg
import pytest

from tests.postgres import require_binaries

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"
SCENARIOS = (
    "ideal_fs",
    "ideal_fs_postgres",
    "ideal_azure",
    "ideal_azure_sequential",
    "ideal_azure_md5",
    "ideal_azure_sequential_md5",
    "ideal_import_sqlite",
    "ideal_import_postgres",
    "export_fs",
    "export_postgres",
    "export_azure",
    "kickoff",
    "import_sqlite",
    "import_postgres",
    "memory",
    "drain",
    "scale",
)
NEEDS_EXTERNAL = {
    "ideal_fs_postgres",
    "export_postgres",
    "ideal_azure",
    "ideal_azure_sequential",
    "ideal_azure_md5",
    "ideal_azure_sequential_md5",
    "export_azure",
    "ideal_import_postgres",
    "import_postgres",
}


def test_bench_runs_every_scenario_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--size",
            "300",
            "--kickoff-size",
            "300",
            "--memory-reference-size",
            "300",
            "--drain-trials",
            "1",
            "--repeat",
            "2",
            "--out",
            str(out),
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = out.glob("*-300.json")
    result = json.loads(path.read_text())
    assert result["size"] == 300
    assert {"cores", "memory_gib", "python"} <= result["machine"].keys()
    assert list(result["scenarios"]) == list(SCENARIOS)
    strict = bool(os.environ.get("CI"))
    for name, scenario in result["scenarios"].items():
        allowed = {"ok"} if strict or name not in NEEDS_EXTERNAL else {"ok", "skipped"}
        assert scenario["status"] in allowed, (name, scenario)
        for t in scenario.get("targets", []):
            assert {"metric", "value", "op", "target", "met"} <= t.keys()
    measured = [n for n, s in result["scenarios"].items() if "resources" in s]
    for name in measured:
        scenario = result["scenarios"][name]
        assert scenario["resources"] > 0 and scenario["bytes"] > 0 and scenario["seconds"] > 0, name
    assert result["scenarios"]["export_fs"]["resources"] == result["resources"]
    # Each ratio is the median of two rounds, a service run beside a run of its loop each.
    paired = {
        name: scenario
        for name, scenario in result["scenarios"].items()
        if scenario["status"] == "ok" and "pairs" in scenario
    }
    assert {"export_fs", "import_sqlite"} <= paired.keys()
    for name, scenario in paired.items():
        assert scenario["pairs"].keys() == scenario["paired_ratio"].keys(), name
        for loop, rounds in scenario["pairs"].items():
            assert len(rounds) == 2, (name, loop)
            for r in rounds:
                assert r["ratio"] == round(r["loop_seconds"] / r["seconds"], 3), (name, r)
            median = (rounds[0]["ratio"] + rounds[1]["ratio"]) / 2
            assert scenario["paired_ratio"][loop] == round(median, 3), (name, loop)
        assert scenario["ratio"] == scenario["paired_ratio"][scenario["ideal_loop"]], name
        assert scenario["seconds"] == min(r["seconds"] for r in rounds), name
    # The PostgreSQL store is seeded with the same data: the same bytes come out of it.
    same = [result["scenarios"][n] for n in ("ideal_fs_postgres", "export_postgres")]
    for scenario in [s for s in same if s["status"] == "ok"]:
        assert (scenario["resources"], scenario["bytes"]) == (
            result["resources"],
            result["scenarios"]["ideal_fs"]["bytes"],
        )
    assert result["scenarios"]["export_fs"]["peak_rss_mb"] > 0
    assert list(tmp_path.iterdir()) == [out]  # the run removed its temporary folders


def test_store_writes_runs_at_a_tiny_size() -> None:
    require_binaries()  # skips without PostgreSQL (fails under CI)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "store_writes.py"), "--patients", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["sqlite", "postgres"] * 2, done.stdout
    assert all("initial" in line and "incremental" in line for line in lines[1:]), done.stdout


@pytest.fixture
def bench_context(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """``bench/context.py``, imported as the bench imports it (``bench/`` on the path);
    the bench's modules are forgotten again afterwards."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    own = {p.stem for p in (ROOT / "bench").glob("*.py")}
    try:
        yield importlib.import_module("context")
    finally:
        for name in own & sys.modules.keys():
            del sys.modules[name]


async def _databases(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r[0] for r in await conn.fetch("SELECT datname FROM pg_database")}
    finally:
        await conn.close()


def test_a_measurement_leaves_no_database_behind(bench_context: ModuleType, tmp_path: Path) -> None:
    require_binaries()  # skips without PostgreSQL (fails under CI)
    ctx = bench_context.Context(size=300, work=tmp_path)
    try:
        cluster = ctx.postgres()
        before = asyncio.run(_databases(cluster.dsn))
        with ctx.new_database() as fresh, ctx.copy_postgres_store(300) as copy:
            during = asyncio.run(_databases(cluster.dsn))
        after = asyncio.run(_databases(cluster.dsn))
    finally:
        ctx.close()
    names = {dsn.rsplit("/", 1)[1].split("?")[0] for dsn in (fresh, copy)}
    assert names <= during - before
    # what stays is only the seeded store the copies are made from
    assert after - before == {f"store_{bench_context.patients_for(300)}p"}
