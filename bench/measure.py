"""One measurement each: an ideal loop, or the service doing the same work over HTTP.

Service measurements start ``exportsvc serve`` (default settings plus the destination or
database under test) on its own copy of the data, time kick-off to manifest as a client
sees it (polling with Retry-After capped at 0.05 s), also note the job's own
``createdAt``..``completedAt`` from ``/_admin/jobs/{id}``, and read the peak RSS of the
service process. Every process and folder a measurement makes is gone when it returns.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from azure.storage.blob import ContainerClient
from common import EXPORT_HEADERS, MB, Service, http_json, measured, poll_until_done, run_cli
from context import Context
from ideal_export import scan_postgres_to_files, scan_to_azure, scan_to_files
from ideal_import import load_postgres, load_sqlite

AZURE_CONTAINER = "exports"


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs; peak RSS is the largest of all of them."""
    fastest = dict(min(runs, key=lambda r: r["seconds"]))
    if len(runs) > 1:
        fastest["runs_seconds"] = [r["seconds"] for r in runs]
    for key in ("peak_rss_mb", "peak_anon_mb"):
        peaks = [r[key] for r in runs if key in r]
        if peaks:
            fastest[key] = max(peaks)
    return fastest


def repeated(ctx: Context, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return best([fn(ctx, *args, **kwargs) for _ in range(ctx.repeat)])


Measure = Callable[[], dict[str, Any]]


def paired(ctx: Context, service: Measure, loops: dict[str, Measure]) -> dict[str, Any]:
    """The service measured ``ctx.repeat`` times, each run right beside a run of each of
    its ideal ``loops`` (the loops first in even rounds, the service first in odd ones), so
    that the machine's drift (this shared VM's disk and CPU change speed within minutes)
    falls on both sides of each ratio alike. The service's best run, with
    ``pairs[loop]``: each round's loop seconds, service seconds and ratio (loop time over
    service time), and ``paired_ratio[loop]``, the median of those ratios."""
    rounds: list[tuple[dict[str, Any], dict[str, dict[str, Any]]]] = []
    for n in range(ctx.repeat):
        if n % 2:
            run = service()
            beside = {name: loop() for name, loop in loops.items()}
        else:
            beside = {name: loop() for name, loop in loops.items()}
            run = service()
        rounds.append((run, beside))
    result = best([run for run, _ in rounds])
    result["pairs"] = {
        name: [
            {
                "loop_seconds": beside[name]["seconds"],
                "seconds": run["seconds"],
                "ratio": round(beside[name]["seconds"] / run["seconds"], 3),
            }
            for run, beside in rounds
        ]
        for name in loops
    }
    result["paired_ratio"] = {
        name: round(statistics.median(p["ratio"] for p in pairs), 3)
        for name, pairs in result["pairs"].items()
    }
    return result


# -- ideal loops ----------------------------------------------------------------------


def ideal_files(ctx: Context, size: int) -> dict[str, Any]:
    out = ctx.scratch("ideal-fs")
    try:
        ctx.quiet()
        started = time.perf_counter()
        resources, nbytes = scan_to_files(ctx.store(size) / "exportsvc.sqlite3", out)
        return measured(resources, nbytes, time.perf_counter() - started)
    finally:
        shutil.rmtree(out)


def ideal_files_postgres(ctx: Context, size: int) -> dict[str, Any]:
    dsn = ctx.postgres().dsn_for(ctx.postgres_store(size))
    out = ctx.scratch("ideal-fs-postgres")
    try:
        ctx.quiet()
        started = time.perf_counter()
        resources, nbytes = asyncio.run(scan_postgres_to_files(dsn, out))
        return measured(resources, nbytes, time.perf_counter() - started)
    finally:
        shutil.rmtree(out)


def ideal_azure(ctx: Context, size: int, *, overlapped: bool, md5: bool) -> dict[str, Any]:
    store = ctx.store(size) / "exportsvc.sqlite3"
    with ctx.azurite() as azurite:
        container = ContainerClient.from_connection_string(azurite.connection_string, "ideal")
        container.create_container()
        try:
            ctx.quiet()
            started = time.perf_counter()
            resources, nbytes = scan_to_azure(
                store, container, "ideal", overlapped=overlapped, md5=md5
            )
            return measured(resources, nbytes, time.perf_counter() - started)
        finally:
            container.close()


def ideal_import(ctx: Context, size: int, *, backend: str) -> dict[str, Any]:
    files = sorted(ctx.inputs(size).glob("*.ndjson"))
    if backend == "postgres":
        with ctx.new_database() as dsn:
            ctx.quiet()
            started = time.perf_counter()
            resources, nbytes = asyncio.run(load_postgres(files, dsn))
            return measured(resources, nbytes, time.perf_counter() - started)
    data = ctx.scratch("ideal-import")
    try:
        run_cli(data, "migrate")
        ctx.quiet()
        started = time.perf_counter()
        resources, nbytes = load_sqlite(files, data / "exportsvc.sqlite3")
        return measured(resources, nbytes, time.perf_counter() - started)
    finally:
        shutil.rmtree(data)


# -- the service ----------------------------------------------------------------------


def _job_seconds(service: Service, job_id: str) -> float | None:
    status, _, job = http_json(f"{service.url}/_admin/jobs/{job_id}")
    if status != 200 or not job.get("completedAt"):
        return None
    created = datetime.fromisoformat(job["createdAt"])
    return (datetime.fromisoformat(job["completedAt"]) - created).total_seconds()


def _follow(service: Service, response: tuple[int, dict[str, str], Any]) -> dict[str, Any]:
    status, headers, body = response
    if status != 202:
        raise RuntimeError(f"kick-off answered {status}: {body}")
    return poll_until_done(headers["Content-Location"])


def service_export(
    ctx: Context, size: int, *, destination: str = "filesystem", backend: str = "sqlite"
) -> dict[str, Any]:
    if destination == "azure-blob":
        with ctx.azurite() as azurite:
            return _service_export(ctx, size, azurite.connection_string, backend)
    return _service_export(ctx, size, None, backend)


def _service_export(ctx: Context, size: int, azure: str | None, backend: str) -> dict[str, Any]:
    if backend != "postgres":
        return _measure_export(ctx, ctx.copy_store(size, "export"), azure, {})
    with ctx.copy_postgres_store(size) as dsn:  # both stores in a copy of the seeded one
        return _measure_export(ctx, ctx.scratch("export-postgres"), azure, {"database_url": dsn})


def _measure_export(
    ctx: Context, data: Path, azure: str | None, database: dict[str, str]
) -> dict[str, Any]:
    settings = ctx.settings | database
    if azure is not None:
        settings |= {
            "destination": "azure-blob",
            "azure_connection_string": azure,
            "azure_container": AZURE_CONTAINER,
        }
    try:
        with Service(data, data / "serve.log", **settings) as service:
            idle = service.rss_kib()
            ctx.quiet()
            started = time.perf_counter()
            response = http_json(f"{service.url}/$export", headers=EXPORT_HEADERS)
            manifest = _follow(service, response)
            seconds = time.perf_counter() - started
            job_id = response[1]["Content-Location"].rsplit("/", 1)[1]
            job_seconds = _job_seconds(service, job_id)
            peak, anon = service.peak_rss_kib, service.peak_anon_kib
        if azure is not None:
            nbytes = _azure_bytes(azure, job_id)
        else:
            nbytes = sum(p.stat().st_size for p in (data / "output" / job_id).glob("*.ndjson"))
    finally:
        shutil.rmtree(data)
    return measured(
        sum(o["count"] for o in manifest["output"]),
        nbytes,
        seconds,
        job_seconds=round(job_seconds, 3) if job_seconds is not None else None,
        files=len(manifest["output"]),
        errors=len(manifest["error"]),
        idle_rss_mb=round(idle * 1024 / MB, 1),
        peak_rss_mb=round(peak * 1024 / MB, 1),
        peak_anon_mb=round(anon * 1024 / MB, 1),
    )


def _azure_bytes(connection_string: str, job_id: str) -> int:
    """The size of the job's blobs."""
    container = ContainerClient.from_connection_string(connection_string, AZURE_CONTAINER)
    try:
        return sum(int(b.size) for b in container.list_blobs(name_starts_with=f"{job_id}/"))
    finally:
        container.close()


def import_body(files: list[Path]) -> dict[str, Any]:
    """``$import`` Parameters: every file by ``file://`` URL, typed by its name."""
    inputs = [
        {
            "name": "input",
            "part": [
                {"name": "type", "valueCode": path.stem},
                {"name": "url", "valueUri": path.resolve().as_uri()},
            ],
        }
        for path in files
    ]
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
            {"name": "mode", "valueCode": "InitialLoad"},
            *inputs,
        ],
    }


def service_import(ctx: Context, size: int, *, backend: str) -> dict[str, Any]:
    if backend != "postgres":
        return _measure_import(ctx, size, {})
    with ctx.new_database() as dsn:
        return _measure_import(ctx, size, {"database_url": dsn})


def _measure_import(ctx: Context, size: int, database: dict[str, str]) -> dict[str, Any]:
    inputs = ctx.inputs(size)
    files = sorted(inputs.glob("*.ndjson"))
    data = ctx.scratch(f"import-{'postgres' if database else 'sqlite'}")
    settings = ctx.settings | database | {"import_root": str(inputs)}
    try:
        with Service(data, data / "serve.log", **settings) as service:
            idle = service.rss_kib()
            ctx.quiet()
            started = time.perf_counter()
            response = http_json(
                f"{service.url}/$import",
                method="POST",
                body=import_body(files),
                headers={"Prefer": "respond-async"},
            )
            manifest = _follow(service, response)
            seconds = time.perf_counter() - started
            job_id = response[1]["Content-Location"].rsplit("/", 1)[1]
            job_seconds = _job_seconds(service, job_id)
            peak, anon = service.peak_rss_kib, service.peak_anon_kib
    finally:
        shutil.rmtree(data)
    return measured(
        sum(o["count"] for o in manifest["output"]),
        sum(p.stat().st_size for p in files),
        seconds,
        job_seconds=round(job_seconds, 3) if job_seconds is not None else None,
        refused=sum(e["count"] for e in manifest["error"]),
        idle_rss_mb=round(idle * 1024 / MB, 1),
        peak_rss_mb=round(peak * 1024 / MB, 1),
        peak_anon_mb=round(anon * 1024 / MB, 1),
    )
