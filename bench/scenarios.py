"""The scenarios of issue 7, in run order, each a function of the run's :class:`Context`.

A scenario returns its measurements and, where the issue sets one, ``targets``: each
``{"metric", "value", "op", "target", "met"}``. Ratios are the service's throughput
over the ideal loop's on the same data in the same run (1.0 = as fast as the loop): the
median, over ``--repeat`` rounds, of a service run against a run of the loop right beside
it (``measure.paired``). The loops' own scenarios (``ideal_*``) are their best-of-N rows
in the table; a service scenario does not need them.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from typing import Any

import drain_service
from context import Context
from measure import (
    ideal_azure,
    ideal_files,
    ideal_files_postgres,
    ideal_import,
    paired,
    repeated,
    service_export,
    service_import,
)

Scenario = Callable[[Context], dict[str, Any]]
MEMORY_RATIO = 1.5
MEMORY_CEILING_MB = 300.0
KICKOFF_SECONDS = 4.0
SCALE_RATIO = 0.8
DRAIN_GRACE_SECONDS = 10.0  # EXPORTSVC_DRAIN_GRACE_SECONDS' default


def target(metric: str, value: float | None, op: str, limit: float) -> dict[str, Any]:
    met = value is not None and (value >= limit if op == ">=" else value <= limit)
    return {"metric": metric, "value": value, "op": op, "target": limit, "met": met}


def _ideal(name: str) -> dict[str, Any]:
    return {"ideal_loop": name}


# -- 1. ideal loops -------------------------------------------------------------------


def ideal_fs(ctx: Context) -> dict[str, Any]:
    return repeated(ctx, ideal_files, ctx.size)


def ideal_fs_postgres(ctx: Context) -> dict[str, Any]:
    return repeated(ctx, ideal_files_postgres, ctx.size)


# Loop (b) in its four forms: overlapped or sequential, with or without Content-MD5.
AZURE_LOOPS = {
    "ideal_azure": {"overlapped": True, "md5": False},
    "ideal_azure_sequential": {"overlapped": False, "md5": False},
    "ideal_azure_md5": {"overlapped": True, "md5": True},
    "ideal_azure_sequential_md5": {"overlapped": False, "md5": True},
}


def _azure_loop(name: str) -> Scenario:
    def run(ctx: Context) -> dict[str, Any]:
        return repeated(ctx, ideal_azure, ctx.size, **AZURE_LOOPS[name])

    return run


def ideal_import_sqlite(ctx: Context) -> dict[str, Any]:
    return repeated(ctx, ideal_import, ctx.size, backend="sqlite")


def ideal_import_postgres(ctx: Context) -> dict[str, Any]:
    return repeated(ctx, ideal_import, ctx.size, backend="postgres")


# -- 2, 3. exports ----------------------------------------------------------------------


def export_fs(ctx: Context) -> dict[str, Any]:
    result = paired(
        ctx,
        lambda: service_export(ctx, ctx.size),
        {"ideal_fs": lambda: ideal_files(ctx, ctx.size)},
    )
    result["ratio"] = result["paired_ratio"]["ideal_fs"]
    result["targets"] = [target("ratio to loop (a)", result["ratio"], ">=", 0.75)]
    return result | _ideal("ideal_fs")


def export_postgres(ctx: Context) -> dict[str, Any]:
    result = paired(
        ctx,
        lambda: service_export(ctx, ctx.size, backend="postgres"),
        {"ideal_fs_postgres": lambda: ideal_files_postgres(ctx, ctx.size)},
    )
    result["ratio"] = result["paired_ratio"]["ideal_fs_postgres"]
    result["targets"] = [target("ratio to loop (a) on PostgreSQL", result["ratio"], ">=", 0.75)]
    return result | _ideal("ideal_fs_postgres")


def export_azure(ctx: Context) -> dict[str, Any]:
    """Against loop (b) as the issue gives it and against the same loop sending each
    block's Content-MD5, as the service does (the like-for-like one); both must hold."""
    result = paired(
        ctx,
        lambda: service_export(ctx, ctx.size, destination="azure-blob"),
        {
            name: lambda options=options: ideal_azure(ctx, ctx.size, **options)
            for name, options in AZURE_LOOPS.items()
        },
    )
    ratios = result["paired_ratio"]
    result["ratio"] = ratios["ideal_azure"]
    result["ratio_to_sequential"] = ratios["ideal_azure_sequential"]
    result["targets"] = [
        target("ratio to loop (b)", ratios["ideal_azure"], ">=", 0.70),
        target("ratio to the sequential loop", ratios["ideal_azure_sequential"], ">=", 1.0),
        target("ratio to loop (b) with Content-MD5", ratios["ideal_azure_md5"], ">=", 0.70),
        target(
            "ratio to the sequential loop with Content-MD5",
            ratios["ideal_azure_sequential_md5"],
            ">=",
            1.0,
        ),
    ]
    return result | _ideal("ideal_azure")


# -- 4. kick-off to manifest on a 400k store --------------------------------------------


def kickoff(ctx: Context) -> dict[str, Any]:
    result = repeated(ctx, service_export, ctx.kickoff_size)
    result["store_size"] = ctx.kickoff_size
    metric = f"kick-off to manifest at {result['resources']:,} resources, s"
    result["targets"] = [target(metric, result["seconds"], "<=", KICKOFF_SECONDS)]
    return result


# -- 6. imports -----------------------------------------------------------------------


def _import(ctx: Context, backend: str) -> dict[str, Any]:
    loop = f"ideal_import_{backend}"
    result = paired(
        ctx,
        lambda: service_import(ctx, ctx.size, backend=backend),
        {loop: lambda: ideal_import(ctx, ctx.size, backend=backend)},
    )
    result["ratio"] = result["paired_ratio"][loop]
    result["targets"] = [target("ratio to loop (c)", result["ratio"], ">=", 0.85)]
    return result | _ideal(loop)


def import_sqlite(ctx: Context) -> dict[str, Any]:
    return _import(ctx, "sqlite")


def import_postgres(ctx: Context) -> dict[str, Any]:
    return _import(ctx, "postgres")


# -- 5. memory ------------------------------------------------------------------------


def memory(ctx: Context) -> dict[str, Any]:
    """Peak RSS of this size's export and import against a reference size (100k)."""
    reference = min(ctx.memory_reference_size, ctx.size)
    result: dict[str, Any] = {"size": ctx.size, "reference_size": reference, "targets": []}
    measures = {
        "export": lambda: service_export(ctx, reference),
        "import": lambda: service_import(ctx, reference, backend="sqlite"),
    }
    for kind, scenario in (("export", "export_fs"), ("import", "import_sqlite")):
        main = ctx.results[scenario]
        ref = main if reference == ctx.size else measures[kind]()
        peak, ref_peak = main["peak_rss_mb"], ref["peak_rss_mb"]
        growth = round(peak / ref_peak, 3) if ref_peak else None
        result[kind] = {
            "peak_rss_mb": peak,
            "reference_peak_rss_mb": ref_peak,
            "growth": growth,
            "peak_anon_mb": main.get("peak_anon_mb"),
            "reference_peak_anon_mb": ref.get("peak_anon_mb"),
        }
        result["targets"] += [
            target(f"{kind} peak RSS / reference", growth, "<=", MEMORY_RATIO),
            target(f"{kind} peak RSS, MB", peak, "<=", MEMORY_CEILING_MB),
        ]
    return result


# -- 7. drain -------------------------------------------------------------------------


def drain_trials(ctx: Context) -> dict[str, Any]:
    """SIGTERM mid-export and mid-import: time to exit; then the job resumes cleanly."""
    rng = random.Random(1)
    expected = ctx.results["ideal_fs"]["resources"]
    result: dict[str, Any] = {"trials_each": ctx.drain_trials, "targets": []}
    for kind, source in (("export", ctx.store(ctx.size)), ("import", ctx.inputs(ctx.size))):
        trials = []
        for _ in range(ctx.drain_trials):
            work = ctx.scratch(f"drain-{kind}")
            trials.append(drain_service.trial(kind, source, work, rng, expected, ctx.settings))
            shutil.rmtree(work)
        result[kind] = drain_service.summary(trials) | {"runs": trials}
        clean = float(not result[kind]["bad"])
        result["targets"] += [
            target(f"{kind} drains and resumes cleanly", clean, ">=", 1),
            target(f"{kind} drain, max s", result[kind]["max_s"], "<=", DRAIN_GRACE_SECONDS),
        ]
    return result


# -- 8. scale -------------------------------------------------------------------------


def scale(ctx: Context) -> dict[str, Any]:
    """Export time at a tenth, a third and all of the size. Linear means the throughput
    does not fall as the size grows: resources/s (of the job itself, from its own start
    and end times) at the full size over that at a third of it. Also fits
    ``t = a + b * n``."""
    points = [
        repeated(ctx, service_export, size)
        for size in sorted({max(1, ctx.size // 10), max(1, ctx.size // 3)} - {ctx.size})
    ]
    points.append(ctx.results["export_fs"])
    rows = [
        {
            "resources": p["resources"],
            "seconds": p["seconds"],
            "job_seconds": p["job_seconds"],
            "job_resources_per_s": round(p["resources"] / p["job_seconds"])
            if p["job_seconds"]
            else None,
        }
        for p in points
    ]
    fit = linear_fit(
        [float(p["resources"]) for p in points],
        [float(p["job_seconds"] or p["seconds"]) for p in points],
    )
    growth = None
    if len(rows) >= 2 and rows[-1]["job_resources_per_s"] and rows[-2]["job_resources_per_s"]:
        growth = round(rows[-1]["job_resources_per_s"] / rows[-2]["job_resources_per_s"], 3)
    metric = "resources/s at the size / at a third of it"
    return {
        "points": rows,
        "fit": fit,
        "throughput_ratio": growth,
        "targets": [target(metric, growth, ">=", SCALE_RATIO)],
    }


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float | None]:
    """Least squares ``y = a + b x``: a (s), b (µs per resource), r²."""
    n = len(xs)
    if n < 2:
        return {"fixed_s": None, "us_per_resource": None, "r2": None}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
    return {"fixed_s": round(a, 3), "us_per_resource": round(b * 1e6, 3), "r2": round(r2, 4)}


# name -> (function, the scenarios whose results it needs)
SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "ideal_fs": (ideal_fs, ()),
    "ideal_fs_postgres": (ideal_fs_postgres, ()),
    **{name: (_azure_loop(name), ()) for name in AZURE_LOOPS},
    "ideal_import_sqlite": (ideal_import_sqlite, ()),
    "ideal_import_postgres": (ideal_import_postgres, ()),
    "export_fs": (export_fs, ()),
    "export_postgres": (export_postgres, ()),
    "export_azure": (export_azure, ()),
    "kickoff": (kickoff, ()),
    "import_sqlite": (import_sqlite, ()),
    "import_postgres": (import_postgres, ()),
    "memory": (memory, ("export_fs", "import_sqlite")),
    "drain": (drain_trials, ("ideal_fs",)),
    "scale": (scale, ("export_fs",)),
}
GROUPS = {
    "ideal": [name for name in SCENARIOS if name.startswith("ideal_")],
    "export": ["export_fs", "export_postgres", "export_azure"],
    "import": ["import_sqlite", "import_postgres"],
}


def expand(selected: list[str]) -> list[str]:
    """The chosen scenarios (names or groups) and what they need, in run order."""
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name in GROUPS:
            for member in GROUPS[name]:
                add(member)
            return
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}: {', '.join([*SCENARIOS, *GROUPS])}")
        wanted.add(name)
        for need in SCENARIOS[name][1]:
            add(need)

    for name in selected:
        add(name)
    return [name for name in SCENARIOS if name in wanted]
