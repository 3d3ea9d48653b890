"""``exportsvc``: serve | worker | seed | validate | import | migrate | jobs."""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
import time
from collections.abc import Sequence

from datastore.postgres import SchemaError
from exportsvc import allocator, logs
from exportsvc.api import create_app
from exportsvc.api.server import serve
from exportsvc.auth.app import AuthConfigError
from exportsvc.import_client import run_import
from exportsvc.records import ExportJobRecord, ImportBatchRecord, ImportJobRecord
from exportsvc.runtime import open_runtime, stores
from exportsvc.seeding import seed_store
from exportsvc.settings import Settings
from exportsvc.sources import SourceReader
from exportsvc.validator import validate_export, validate_import
from exportsvc.views import JobView


def _started() -> None:
    """Start-up is over: what it built (modules, the app, pools, caches) lives as long as
    the process. Frozen out of the cyclic garbage collector's way: otherwise each of its
    full collections walks all of it again, holding the GIL for 25-50 ms, several times a
    second while a job allocates (an import of 73,563 Observations on PostgreSQL spent
    0.2-0.4 s of its 1.45-1.55 s so; frozen, a full collection takes 2-5 ms)."""
    gc.freeze()


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    app = create_app(settings, with_worker=not args.no_worker)

    def ready() -> None:
        _started()
        print(f"exportsvc serving on http://{args.host}:{args.port}", flush=True)

    asyncio.run(serve(app, settings, args.host, args.port, ready=ready))
    return 0


async def _worker(settings: Settings) -> int:
    async with open_runtime(settings) as runtime:
        worker = runtime.worker()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        _started()
        await worker.run()
    return 0


async def _seed(args: argparse.Namespace, settings: Settings) -> int:
    async with open_runtime(settings) as runtime:
        if args.if_empty and await runtime.resources.current_seq() > 0:
            print("the store already holds data; not seeding (--if-empty)")
            return 0
        started = time.perf_counter()
        total = await seed_store(runtime.resources, args.patients, args.seed)
        elapsed = time.perf_counter() - started
        print(
            f"seeded {total} resources for {args.patients} patients in {elapsed:.1f}s "
            f"({total / elapsed:,.0f} resources/s) into {_where(settings)}"
        )
    return 0


async def _validate(args: argparse.Namespace, settings: Settings) -> int:
    async with open_runtime(settings) as runtime:
        record = await runtime.operations.get(args.job_id)
        if isinstance(record, ExportJobRecord):
            dest = runtime.destinations.for_job(record.id, record.request.container)
            view = JobView(record, await runtime.operations.children(record.id))
            report = await validate_export(view, runtime.resources, dest)
        elif isinstance(record, ImportJobRecord):
            batches = [
                b
                for b in await runtime.operations.children(record.id)
                if isinstance(b, ImportBatchRecord)
            ]
            sources = SourceReader(settings, runtime.destinations)
            try:
                report = await validate_import(
                    record,
                    batches,
                    runtime.resources,
                    sources,
                    lambda b, name: runtime.destinations.for_job(b.id, None).read(name),
                    max_line_bytes=settings.import_max_line_bytes,
                    max_depth=settings.import_max_depth,
                )
            finally:
                await sources.close()
        else:
            print(f"no export or import job {args.job_id!r}", file=sys.stderr)
            return 2
        print(report.render())
        return 0 if report.ok else 1


async def _migrate(settings: Settings) -> int:
    operations, resources = stores(settings, migrate=True)
    await operations.open()  # PostgreSQL: applies the numbered migrations; SQLite likewise
    await resources.open()
    await resources.close()
    await operations.close()
    print(f"the schema of {_where(settings)} is up to date")
    return 0


async def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    async with open_runtime(settings) as runtime:
        records = await runtime.operations.list(limit=args.limit)
        views = [JobView(r, await runtime.operations.children(r.id)) for r in records]
    print(f"{'id':<34}{'kind':<8}{'status':<11}{'progress':>22}{'fails':>6}{'restarts':>9}  error")
    for view in views:
        r = view.job
        total = "?" if view.total_estimate is None else str(view.total_estimate)
        progress = f"{view.resources_done}/{total}"
        print(
            f"{r.id:<34}{r.kind:<8}{r.status.value:<11}{progress:>22}{view.failure_count:>6}"
            f"{view.restart_count:>9}  {view.last_error or ''}"
        )
    return 0


def _where(settings: Settings) -> str:
    """The database, for messages (never the URL: it may carry a password)."""
    return "PostgreSQL" if settings.database_url else str(settings.database_path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exportsvc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the API with an in-process worker")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--no-worker", action="store_true", help="API only")
    sub.add_parser("worker", help="run a worker (no API)")
    seed = sub.add_parser("seed", help="write deterministic synthetic demo data")
    seed.add_argument("--patients", type=int, required=True)
    seed.add_argument("--seed", type=int, default=0)
    seed.add_argument("--if-empty", action="store_true", help="do nothing if data exists")
    validate = sub.add_parser(
        "validate", help="compare a finished export with the store, or an import's inputs"
    )
    validate.add_argument("job_id")
    load = sub.add_parser("import", help="import ndjson files or URLs through the API")
    load.add_argument("inputs", nargs="+", metavar="FILE_OR_URL")
    load.add_argument("--server", default="http://127.0.0.1:8080", help="the service's base URL")
    load.add_argument("--type", help="the resource type of every input (checked per line)")
    load.add_argument(
        "--mode", default="IncrementalLoad", choices=["IncrementalLoad", "InitialLoad"]
    )
    sub.add_parser("migrate", help="create or upgrade the database schema")
    jobs = sub.add_parser("jobs", help="list jobs with status and progress")
    jobs.add_argument("--limit", type=int, default=50)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("serve", "worker"):
        allocator.tune()  # before any thread starts
    settings = Settings()
    logs.configure()
    try:
        return _run(args, settings)
    except SchemaError as exc:
        print(f"exportsvc: {exc.message}", file=sys.stderr)
        return 2
    except AuthConfigError as exc:
        print(f"exportsvc: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        return _serve(args, settings)
    if args.command == "worker":
        return asyncio.run(_worker(settings))
    if args.command == "seed":
        return asyncio.run(_seed(args, settings))
    if args.command == "validate":
        return asyncio.run(_validate(args, settings))
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    if args.command == "import":
        return asyncio.run(run_import(args.server, args.inputs, type_=args.type, mode=args.mode))
    return asyncio.run(_jobs(args, settings))


if __name__ == "__main__":
    sys.exit(main())
