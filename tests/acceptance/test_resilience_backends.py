"""The kill -9 loop, the SIGTERM drain and the stalled worker of test_resilience.py, on the
other backends and for ``$import`` (DESIGN.md 4-6).

test_resilience.py proves the core promise with real processes on SQLite and the
filesystem destination. The same scenarios run here (the stalled worker on PostgreSQL,
with the filesystem and with Azure Blob Storage; ``api_on`` starts the service on any
store):

- with an Azure Blob destination (Azurite). After every kill, each file a record says is
  committed is its blob's committed block list up to the recorded blocks and bytes (what
  ``restore`` demands); at the end every file is downloaded through the manifest's SAS
  URL and equals the store, nothing the manifest does not list is left under the job's
  prefix, and ``exportsvc validate`` agrees;
- with PostgreSQL as the store (both stores; filesystem destination), checked as on SQLite;
- for ``$import`` (SQLite and PostgreSQL, filesystem): ndjson inputs with broken lines
  (malformed JSON, wrong type, invalid id), 64 KiB batches and a commit every 50 lines,
  so kills land mid-batch. At the end ``exportsvc validate`` finds every resource and every refused
  line reported exactly once, and no resource has more than its one version.

Every kill loop checks, as the filesystem one does: the next start of each unit a killed
worker held resumed exactly what its record held after the kill; every start resumed the
last checkpoint logged under an earlier lease (or one unlogged commit later, when a kill
fell between a checkpoint's save and its log line); one restart and one re-acquisition
(counted by lease version) per interrupted lease, and no failure, crash or lost lease;
and a job split into work items keeps no lease of its own.

test_a_planned_export_holds_no_lease_on_postgres pins down what these tests found on
PostgreSQL: a late heartbeat on an export its planning had just released (see its
docstring).

Import batches log ``offset=`` (a byte offset in their input) where export units log
``pages_read=``. Seen as the bytes read into their batch (``offset - start``, put in
``pages_read``: :func:`as_pages`), their log lines suit the helpers of test_resilience.py
unchanged: a batch's first start is at 0, a resume at its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContainerClient

from tests.azurite import Azurite

from .conftest import (
    ASYNC_HEADERS,
    Key,
    LiveServer,
    LiveWorker,
    LogEvent,
    PostgresDatabases,
    PostgresStore,
    SeededTemplates,
    ServerFactory,
    WorkerFactory,
    http,
    job_id_of,
    postgres_settings,
    wait_until,
)
from .test_resilience import (
    COMMIT_EVERY_PAGES,
    DRAIN_BUDGET_SECONDS,
    EXPORT_PATH,
    FINISH_SECONDS,
    KILLS,
    MAX_FILE_BYTES,
    RNG_SEED,
    TROUBLE,
    TYPES,
    Kill,
    StatusPoller,
    Units,
    assert_complete_and_valid,
    assert_resumed_at,
    assert_woke_and_wrote_nothing,
    file_sizes,
    next_checkpoint,
    of_units,
    output_folder,
    owner_of,
    paged,
    progressed,
    resume_mismatches,
    settings,
    stall_past_its_lease,
    stalled_settings,
    stalled_worker_on_the_filesystem,
    starts_by_unit,
    stop_points,
    troubles,
)

pytestmark = pytest.mark.acceptance

AZURE_PATIENTS = 100  # every 1 KiB block is a request to Azurite: a smaller export lasts
POSTGRES_PATIENTS = 300
POSTGRES_COMMIT_EVERY_PAGES = 12
LINES_PER_COMMIT = 50
GROUP_ROWS = 2 * LINES_PER_COMMIT  # SQLite: the blocks of a few batches share a commit
IMPORT_BATCH_BYTES = 64 * 1024

Progress = Callable[[dict[str, Any]], int | None]
"""A unit's row → how far it has read (None: a unit that reads nothing, the planning)."""
AfterKill = Callable[[dict[str, dict[str, Any]], dict[str, tuple[int, int | None]]], bool]
"""Checks the store and destination right after a kill: (rows, units the worker held →
(lease version, progress)) → whether the kill left something of interest behind."""
Events = Callable[[list[LogEvent]], list[LogEvent]]
OneCommit = Callable[[LogEvent | None, LogEvent], bool]
"""Whether a start is one commit past a logged state (a checkpoint or start, or None)."""


def pages_read(row: dict[str, Any]) -> int | None:
    value: int | None = row["record"].get("pages_read")
    return value


def same(events: list[LogEvent]) -> list[LogEvent]:
    return events


# -- the kill -9 loop and the drain, for any backend ---------------------------------------


@dataclass
class KillLoop:
    """Starts a worker, lets it work a random while, ``kill -9``s it; ``KILLS`` times."""

    api: LiveServer
    units: Units
    start_worker: WorkerFactory
    progress: Progress
    after_kill: AfterKill
    checkpoints: int = 0
    """0: kill a random 0.05-0.6 s after the worker's first start, as test_resilience does;
    n: right after its k-th checkpoint, k drawn from 1..n (bounds the work done per kill
    whatever the machine's speed: a fast job then still outlasts the loop)."""
    workers: list[LiveWorker] = dataclasses.field(default_factory=list)
    kills: list[Kill] = dataclasses.field(default_factory=list)
    remarkable: int = 0
    """Kills after which ``after_kill`` found something of interest."""

    def run(self) -> None:
        rng = random.Random(RNG_SEED)
        job = self.units.job
        for n in range(1, KILLS + 1):
            worker = self.start_worker(self.api)
            self.workers.append(worker)
            owner = owner_of(worker)
            if rng.random() < 0.2:  # while connecting and restoring the files
                worker.wait_for("job.acquired", self.units.of)
                time.sleep(rng.uniform(0.0, 0.02))
            elif not self.checkpoints:  # mid-page, mid-write, between commit and checkpoint
                worker.wait_for("job.started", self.units.of)
                time.sleep(rng.uniform(0.05, 0.6))
            else:  # the same, at most a few commits into the work
                self._wait_for_checkpoints(worker, rng.randint(1, self.checkpoints))
                time.sleep(rng.uniform(0.0, 0.005))
            assert worker.running, f"{worker.name} exited early:\n{worker.stderr()}"
            worker.kill()
            rows = self.units.rows()
            assert rows[job]["status"] != "completed", (
                f"{job} finished after only {n} of {KILLS} kills: make it longer (seed {RNG_SEED})"
            )
            held = {
                u: (r["lease_version"], self.progress(r))
                for u, r in rows.items()
                if r["status"] == "running" and r["lease_owner"] == owner
            }
            self.kills.append(Kill(worker.name, held))
            self.remarkable += self.after_kill(rows, held)

    def _wait_for_checkpoints(self, worker: LiveWorker, count: int) -> None:
        def enough() -> bool:
            if not worker.running:
                pytest.fail(f"{worker.name} exited early:\n{worker.stderr()}")
            return len(worker.log.events("job.checkpoint", self.units.of)) >= count

        wait_until(enough, f"{count} checkpoints by {worker.name}", timeout=30, interval=0.002)

    def assert_resumed(self, normalize: Events, one_commit: OneCommit) -> None:
        """test_resilience's checks after its kill loop (log lines through ``normalize``).

        A start must resume the last checkpoint logged under an earlier lease, or the
        state an earlier lease logged at its start when it logged no checkpoint; a kill
        between a checkpoint's save and its log line leaves that checkpoint unlogged: then
        the next start is ``one_commit`` past the furthest logged state of an earlier lease,
        and equals what the record held after a kill (checked first).
        """
        units, kills = self.units, self.kills
        logs = [normalize(w.log.events()) for w in self.workers]
        lifecycle = of_units(logs, units, "job.started", "job.checkpoint")
        starts = starts_by_unit(lifecycle)
        held: dict[str, set[int]] = {}
        for kill in kills:
            for unit, (version, at) in kill.held.items():
                if at is None:  # not a reading unit (the planning of the export)
                    continue
                held.setdefault(unit, set()).add(at)
                later = [s for s in starts.get(unit, []) if s.number("version") > version]
                assert later, f"{unit}, held by {kill.worker} when killed, never started again"
                assert later[0].number("pages_read") == at, (str(later[0]), kill)

        def furthest_before(started: LogEvent) -> LogEvent | None:
            """A checkpoint, or a start (it logs what the record held), of an earlier lease."""
            unit, version = started.fields["job"], started.number("version")
            earlier = [
                e
                for e in lifecycle
                if paged(e) and e.fields["job"] == unit and e.number("version") < version
            ]
            return max(earlier, key=lambda e: e.number("pages_read"), default=None)

        def explained(started: LogEvent) -> bool:
            before, at = furthest_before(started), started.number("pages_read")
            if before is not None and before.number("pages_read") == at:
                return True  # the lease before logged its start here, and no checkpoint
            return at in held.get(started.fields["job"], set()) and one_commit(before, started)

        unexplained = [m for m in resume_mismatches(lifecycle) if not explained(m.started)]
        assert not unexplained, f"restarts not from the last checkpoint (seed {RNG_SEED}):\n" + (
            "\n".join(map(str, unexplained))
        )
        assert all(s[0].number("pages_read") == 0 for s in starts.values()), starts
        restarts = [
            (a.number("pages_read"), b.number("pages_read"))
            for s in starts.values()
            for a, b in itertools.pairwise(s)
        ]
        assert all(a <= b for a, b in restarts), f"a restart went backwards: {starts}"
        increases = sum(a < b for a, b in restarts)
        assert increases >= len(restarts) / 2, f"restarts mostly made no progress: {starts}"

        # One restart and one re-acquisition per interrupted lease, and nothing else.
        # Acquisitions are counted by lease version: a kill may fall between an
        # acquisition and its log line.
        expected = sum(len(kill.held) for kill in kills)
        re_acquired = sum(max(r["lease_version"] - 1, 0) for r in units.rows().values())
        trouble = troubles(logs, units)
        view = self.api.admin_job(units.job)
        assert view["status"] == "completed", f"admin view: {view}"
        shown = "\n".join(map(str, trouble[:12])) + ("\n..." if len(trouble) > 12 else "")
        assert (view["restartCount"], re_acquired) == (expected, expected), (
            f"{KILLS} kills interrupted {expected} leases: that should make {expected} "
            f"restarts and re-acquisitions, not {view['restartCount']} and {re_acquired}; "
            f"{len(trouble)} unexpected events:\n{shown}"
        )
        assert view["failureCount"] == 0 and not trouble, shown
        assert_follows_its_items(units.rows()[units.job])


def export_commit(pages: int = COMMIT_EVERY_PAGES) -> OneCommit:
    """The next checkpoint, with a commit every ``pages`` pages."""

    def one_commit(before: LogEvent | None, started: LogEvent) -> bool:
        base = before.number("pages_read") if before is not None else 0
        return next_checkpoint(base, started.number("pages_read"), pages)

    return one_commit


def assert_handed_back(units: Units, stopped: dict[str, int], progress: Progress) -> None:
    """test_resilience's check after a drain, for any progress measure: every unfinished
    unit queued, unleased and unfailed; the drained ones at their last checkpoint."""
    assert stopped, "no unit was stopped at a checkpoint"
    for unit, row in units.work().items():
        if row["status"] == "completed":
            continue
        record = row["record"]
        state = (row["status"], row["lease_owner"], record["failure_count"], record["last_error"])
        assert state == ("queued", None, 0, None), (unit, state)
        if unit in stopped:
            assert progress(row) == stopped[unit], (unit, progress(row), stopped)


def drain_then_resume(
    api: LiveServer,
    start_worker: WorkerFactory,
    status_url: str,
    units: Units,
    *,
    advanced: Callable[[LogEvent], bool],
    progress: Progress,
    normalize: Events,
    complete: Callable[[], object],
) -> None:
    """test_sigterm_drains_the_worker_and_another_resumes, for any backend and job kind.

    A worker past its first checkpoint (``advanced``) gets SIGTERM while a client polls
    the status URL: it exits 0 within the budget, every poll answers 202, the job waits
    queued at its checkpoints; a second worker finishes it (``complete`` checks the
    result) resuming each drained unit exactly there.
    """
    job = units.job
    first = start_worker(api)  # default drain grace
    first.wait_for("job.checkpoint", advanced)
    assert api.admin_job(job)["status"] == "running"

    with StatusPoller(api, status_url).running() as poller:
        signalled = time.monotonic()
        first.signal(signal.SIGTERM)
        code = first.process.wait(timeout=60)
        exited = time.monotonic()
        wait_until(lambda: poller.polls[-1][0] > exited, "a status poll after the exit", 10)
    took = exited - signalled
    assert code == 0, first.stderr()
    assert took < DRAIN_BUDGET_SECONDS, f"the drain took {took:.2f}s"
    wrong = [p for p in poller.polls if p[1] != 202]
    assert not wrong, f"status polls during the drain answered {wrong[:5]}"
    during = [p for p in poller.polls if signalled <= p[0] <= exited]
    assert during, f"no status poll while the worker drained ({took:.3f}s)"

    drained = stop_points(normalize(first.log.events()), units, "job.drained")
    assert_handed_back(units, drained, progress)
    view = api.admin_job(job)
    assert (view["status"], view["leaseOwner"]) == ("queued", None), f"admin view: {view}"
    assert view["resourcesDone"] > 0 and view["failureCount"] == 0, f"admin view: {view}"
    assert view["itemsDone"] < view["items"], f"drained too late: it was done: {view}"
    if view["resourcesTotal"] is not None:
        assert view["resourcesDone"] < view["resourcesTotal"], f"admin view: {view}"

    parent = units.rows()[job]

    second = start_worker(api)
    complete()
    assert second.stop() == 0, second.stderr()
    assert_resumed_at(of_units([normalize(second.log.events())], units, "job.started"), drained)
    assert_follows_its_items(parent)


def assert_follows_its_items(parent: dict[str, Any]) -> None:
    """A job split into work items holds no lease of its own once they exist: no owner and
    no expiry, or it is taken up again as a crashed job when that expiry passes."""
    owner, expires = parent["lease_owner"], parent["lease_expires"]
    assert (owner, expires) == (None, None), (
        f"{parent['id']} ({parent['status']}) follows its items, yet holds a lease expiry "
        f"{(expires or 0) - time.time():+.1f}s from now (owner {owner}, version "
        f"{parent['lease_version']}): once it passes, the job is acquired again as if its "
        "worker had crashed"
    )


# -- the service on a backend ---------------------------------------------------------------


def api_on(
    start_exportsvc: ServerFactory, tmp_path: Path, store: Path | str | None, **options: str
) -> LiveServer:
    """``serve --no-worker`` on ``store``: a seeded SQLite data dir (a template, copied), a
    PostgreSQL DSN (both stores in it; its ``store`` then reads that database) or None (a
    new, empty SQLite store). The destination is the filesystem unless ``options`` say
    otherwise (``AzureContainer``)."""
    data_dir = tmp_path / "data"
    if isinstance(store, Path):
        shutil.copytree(store, data_dir)
        return start_exportsvc.api_only(data_dir, **options)
    data_dir.mkdir()
    if store is None:
        return start_exportsvc.api_only(data_dir, **options)
    api = start_exportsvc.api_only(data_dir, **options, **postgres_settings(store))
    api.store = PostgresStore.of(store)
    return api


# -- destinations, looked at right after a kill -------------------------------------------


def committed_files(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every file the records list, by name (names are unique within a job)."""
    return {f["name"]: f for r in rows.values() for f in r["record"].get("output", [])}


def on_disk(api: LiveServer, job: str) -> AfterKill:
    """test_resilience's check: what a record says is committed is on disk (the commit
    preceded the save); remarkable: bytes past the last checkpoint on disk."""
    folder = output_folder(api, job)

    def check(rows: dict[str, dict[str, Any]], _held: object) -> bool:
        sizes = file_sizes(folder)
        committed = {n: f["committed_bytes"] for n, f in committed_files(rows).items()}
        for name, length in committed.items():
            assert sizes.get(name, -1) >= length, (name, length, sizes.get(name))
        return any(
            size > committed.get(name, 0)
            for name, size in sizes.items()
            if not name.startswith(".lock")
        )

    return check


@dataclass(frozen=True)
class BlobBlocks:
    committed: list[tuple[str, int]]  # (block id, size), in order
    uncommitted_bytes: int

    @property
    def committed_bytes(self) -> int:
        return sum(size for _, size in self.committed)


class AzureContainer:
    """A test's own container in Azurite, seen with the account key."""

    def __init__(self, azurite: Azurite) -> None:
        self.azurite = azurite
        self.name = f"c{uuid.uuid4().hex[:16]}"
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        self.client: ContainerClient = service.get_container_client(self.name)

    def settings(self) -> dict[str, str]:
        return {
            "destination": "azure-blob",
            "azure_connection_string": self.azurite.connection_string,
            "azure_container": self.name,
        }

    def blobs(self, job: str, *, uncommitted: bool = True) -> dict[str, BlobBlocks]:
        """The blobs under ``{job}/`` by file name, with their committed and staged blocks
        (``uncommitted=False``: committed blobs only, without their blocks)."""
        prefix = f"{job}/"
        include = ["uncommittedblobs"] if uncommitted else None
        try:
            names = [b.name for b in self.client.list_blobs(prefix, include=include)]
        except ResourceNotFoundError:  # no worker has connected yet
            return {}
        found = {}
        for name in names:
            blocks = BlobBlocks([], 0)
            if uncommitted:
                committed, staged = self.client.get_blob_client(name).get_block_list("all")
                blocks = BlobBlocks(
                    [(b.id, b.size) for b in committed], sum(b.size for b in staged)
                )
            found[name.removeprefix(prefix)] = blocks
        return found

    def after_kill(self, job: str) -> AfterKill:
        """Each committed file of the records is its blob's committed block list up to
        the recorded blocks and bytes (else ``restore`` refuses to resume); remarkable:
        staged blocks or blocks committed after the last checkpoint."""

        def check(rows: dict[str, dict[str, Any]], _held: object) -> bool:
            blobs = self.blobs(job)
            recorded = committed_files(rows)
            for name, f in recorded.items():
                if f["etag"] is None:  # never committed: the blob need not exist
                    continue
                blob = blobs.get(name)
                assert blob is not None, f"{name} committed ({f['committed_bytes']} bytes), gone"
                prefix = blob.committed[: len(f["committed_blocks"])]
                assert [i for i, _ in prefix] == f["committed_blocks"], (name, blob, f)
                assert sum(s for _, s in prefix) == f["committed_bytes"], (name, blob, f)
            return any(
                b.uncommitted_bytes
                or b.committed_bytes > recorded.get(name, {}).get("committed_bytes", 0)
                for name, b in blobs.items()
            )

        return check

    def assert_complete_and_valid(self, api: LiveServer, status_url: str) -> dict[str, Any]:
        """Files read through their SAS URLs (no key) equal the store; nothing unlisted is
        left under the job's prefix; ``exportsvc validate`` agrees."""
        job = job_id_of(status_url)
        manifest: dict[str, Any] = api.wait_for_manifest(status_url, FINISH_SECONDS).json()
        exported: dict[Key, bytes] = {}
        duplicates: list[Key] = []
        names = set()
        for entry in manifest["output"]:
            url = entry["url"]
            where = f"{self.azurite.blob_endpoint}/{self.name}/{job}/"
            assert url.startswith(where) and "sig=" in url, url
            names.add(url.split("?", 1)[0].removeprefix(where))
            response = http("GET", url)  # a plain client: no key, no token
            assert response.status == 200, (url.split("?", 1)[0], response.status)
            assert len(response.body) <= MAX_FILE_BYTES, (url.split("?", 1)[0], entry)
            lines = response.body.splitlines()
            assert len(lines) == entry["count"], (entry, len(lines))
            for line in lines:
                resource = json.loads(line)
                assert resource["resourceType"] == entry["type"], (entry, line[:200])
                key = (resource["resourceType"], resource["id"])
                if key in exported:
                    duplicates.append(key)
                exported[key] = line
        assert not duplicates, f"exported more than once: {duplicates[:10]}"
        expected = api.store.current(TYPES)
        missing, extra = expected.keys() - exported.keys(), exported.keys() - expected.keys()
        assert not missing and not extra, (sorted(missing)[:10], sorted(extra)[:10])
        differ = [k for k, raw in expected.items() if exported[k] != raw]
        assert not differ, f"exported bytes differ from the store: {differ[:10]}"
        observation = [e for e in manifest["output"] if e["type"] == "Observation"]
        assert len(observation) >= 3, f"Observation should span several files: {observation}"
        left = set(self.blobs(job, uncommitted=False)) - names
        assert not left, f"blobs under the job's prefix the manifest does not list: {left}"
        result = api.validate(job)
        assert result.returncode == 0, result.stdout + result.stderr
        return manifest


# -- export on Azure Blob Storage (Azurite) -----------------------------------------------


@pytest.fixture
def azure_container(azurite: Azurite) -> AzureContainer:
    return AzureContainer(azurite)


def test_kill_9_loop_on_azure_blob(
    seeded_templates: SeededTemplates,
    azure_container: AzureContainer,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    # One resource a page and 1 KiB blocks: blocks are staged between the commits, and a
    # restart must drop them (and any block list committed after the last checkpoint).
    api = api_on(
        start_exportsvc,
        tmp_path,
        seeded_templates(AZURE_PATIENTS),
        **settings(page_size="1", block_bytes="1024", lease_seconds="1"),
        **azure_container.settings(),
    )
    status_url = api.kick_off("GET", EXPORT_PATH)
    job = job_id_of(status_url)
    loop = KillLoop(api, Units(api, job), start_worker, pages_read, azure_container.after_kill(job))
    loop.run()
    assert loop.remarkable >= KILLS // 5, (
        f"only {loop.remarkable} kills left staged or uncheckpointed blocks: restore is "
        "barely exercised"
    )
    # Resumes by continuation point, not page; bigger blocks, fewer requests.
    final = start_worker(api, page_size="50", block_bytes=str(1 << 20))
    loop.workers.append(final)
    azure_container.assert_complete_and_valid(api, status_url)
    assert final.stop() == 0, final.stderr()
    loop.assert_resumed(same, export_commit())


def test_sigterm_drain_on_azure_blob(
    seeded_templates: SeededTemplates,
    azure_container: AzureContainer,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    api = api_on(
        start_exportsvc,
        tmp_path,
        seeded_templates(AZURE_PATIENTS),
        **settings(block_bytes="4096"),
        **azure_container.settings(),
    )
    status_url = api.kick_off("GET", EXPORT_PATH)
    units = Units(api, job_id_of(status_url))
    drain_then_resume(
        api,
        start_worker,
        status_url,
        units,
        advanced=progressed(units),
        progress=pages_read,
        normalize=same,
        complete=lambda: azure_container.assert_complete_and_valid(api, status_url),
    )


# -- export with PostgreSQL as the store --------------------------------------------------


def test_kill_9_loop_on_postgres(
    postgres_databases: PostgresDatabases,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    # A commit every 12 pages, not 3: some 10 KB between commits, more than the file's
    # 4 KiB write buffer, so bytes past the last commit reach the disk before the next
    # commit. (On SQLite the kills that find such bytes mostly fall between a commit and
    # the record's save, a window PostgreSQL without synchronous commit keeps short.)
    options = settings(
        page_size="1",
        block_bytes="1024",
        lease_seconds="1",
        commit_every_pages=str(POSTGRES_COMMIT_EVERY_PAGES),
    )
    api = api_on(start_exportsvc, tmp_path, postgres_databases(POSTGRES_PATIENTS), **options)
    status_url = api.kick_off("GET", EXPORT_PATH)
    job = job_id_of(status_url)
    loop = KillLoop(api, Units(api, job), start_worker, pages_read, on_disk(api, job))
    loop.run()
    assert loop.remarkable >= KILLS // 5, (
        f"only {loop.remarkable} kills left uncommitted bytes on disk: restore is barely exercised"
    )
    final = start_worker(api, page_size="100")  # resumes by continuation point, not page
    loop.workers.append(final)
    assert_complete_and_valid(api, status_url)
    assert final.stop() == 0, final.stderr()
    loop.assert_resumed(same, export_commit(POSTGRES_COMMIT_EVERY_PAGES))


def test_sigterm_drain_on_postgres(
    postgres_databases: PostgresDatabases,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    api = api_on(start_exportsvc, tmp_path, postgres_databases(POSTGRES_PATIENTS), **settings())
    status_url = api.kick_off("GET", EXPORT_PATH)
    units = Units(api, job_id_of(status_url))
    drain_then_resume(
        api,
        start_worker,
        status_url,
        units,
        advanced=progressed(units),
        progress=pages_read,
        normalize=same,
        complete=lambda: assert_complete_and_valid(api, status_url),
    )


def test_a_planned_export_holds_no_lease_on_postgres(
    postgres_databases: PostgresDatabases,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    """Once planned, an export follows its items: no lease owner, no lease expiry, and no
    word of a lost lease from the worker that planned it.

    On PostgreSQL the planning's NOTIFY wakes that worker's heartbeat for the export at
    once, so it mostly runs after the planning released the lease. It used to set an
    expiry again (the export was then acquired as if its worker had crashed, and failed
    for want of its deleted destination secret); a heartbeat that finds the lease gone
    must not report it lost either: the planning gave it back. Several small exports, so
    one lucky interleaving does not hide either.
    """
    api = api_on(start_exportsvc, tmp_path, postgres_databases(POSTGRES_PATIENTS), **settings())
    worker = start_worker(api)
    status_urls = [
        api.kick_off("GET", f"/$export?_type={types}")
        for types in ("Patient", "Condition", "Patient,Condition", "Encounter")
    ]
    for status_url in status_urls:
        api.wait_for_manifest(status_url)
    jobs = [job_id_of(url) for url in status_urls]
    leased = [
        row
        for row in map(api.store.job, jobs)
        if (row["lease_owner"], row["lease_expires"]) != (None, None)
    ]
    assert worker.stop() == 0, worker.stderr()
    shown = [(r["id"], r["status"], r["lease_owner"], r["lease_expires"]) for r in leased]
    assert not leased, (
        f"{len(leased)} of {len(jobs)} planned exports got a lease expiry back after "
        f"planning released it (id, status, owner, expiry): {shown}"
    )
    trouble = [e for e in worker.log.events() if e.event in TROUBLE and e.fields["job"] in jobs]
    assert not trouble, (
        f"{len({e.fields['job'] for e in trouble})} of {len(jobs)} exports had trouble after "
        "their planning released them:\n" + "\n".join(map(str, trouble))
    )


def test_a_stalled_worker_cannot_write_beside_the_new_owner_on_postgres(
    postgres_databases: PostgresDatabases,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    """test_resilience's stalled worker with PostgreSQL as the store: the lease and its
    fencing live in PostgreSQL, the files' lock on the filesystem."""
    api = api_on(
        start_exportsvc, tmp_path, postgres_databases(POSTGRES_PATIENTS), **stalled_settings()
    )
    status_url = api.kick_off("GET", EXPORT_PATH)
    stalled_worker_on_the_filesystem(api, start_worker, status_url)


def test_a_stalled_worker_cannot_write_beside_the_new_owner_on_azure_blob(
    postgres_databases: PostgresDatabases,
    azure_container: AzureContainer,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    """The scale-out set-up (PostgreSQL, Azure Blob Storage) with a stalled worker.

    A blob has no lock a stalled writer keeps: the new owner takes the unit over at once,
    re-commits the recorded block lists and goes on. The stalled worker is woken while the
    new owner works; it finds its lease gone and stops. Whatever it staged or tried to
    commit stays out: the blobs hold no block of its session beyond those the record
    held when it stalled, and the export equals the store.
    """
    api = api_on(
        start_exportsvc,
        tmp_path,
        postgres_databases(POSTGRES_PATIENTS),
        **stalled_settings(),
        **azure_container.settings(),
    )
    status_url = api.kick_off("GET", EXPORT_PATH)
    job = job_id_of(status_url)
    units = Units(api, job)
    stalled = stall_past_its_lease(api, start_worker, units)
    recorded = {f["name"]: f["committed_blocks"] for f in stalled.row["record"]["output"]}
    sessions = {block.rsplit("-", 1)[0] for ids in recorded.values() for block in ids}
    assert sessions, f"nothing committed before the stall: {stalled.row['record']['output']}"

    second = start_worker(api)
    second.wait_for(
        "job.checkpoint",
        lambda e: e.number("version") > stalled.version and e.number("pages_read") > stalled.at,
        job=stalled.unit,
    )
    assert api.admin_job(job)["status"] == "running", "the new owner finished too soon"
    stalled.zombie.signal(signal.SIGCONT)
    logged = stalled.zombie.wait_for("job.lease_lost", job=stalled.unit)
    azure_container.assert_complete_and_valid(api, status_url)

    blobs = azure_container.blobs(job)
    stray = {
        name: ids
        for name, blob in blobs.items()
        if (
            ids := [
                i
                for i, _ in blob.committed
                if i.rsplit("-", 1)[0] in sessions and i not in recorded.get(name, [])
            ]
        )
    }
    assert not stray, f"blocks of the stalled worker committed after it stalled: {stray}"
    assert_woke_and_wrote_nothing(stalled, [second], units, logged=logged)
    # The workers' logs are the service's events, not a line per Azure request.
    chatter = [
        e for w in (stalled.zombie, second) for e in w.log.events() if e.logger.startswith("azure")
    ]
    assert all(e.level in ("WARNING", "ERROR") for e in chatter), "\n".join(map(str, chatter[:5]))


# -- $import ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportInputs:
    """ndjson files in an import root, and what a correct import makes of them."""

    root: Path
    files: list[tuple[Path, str | None]]  # (file, declared type)
    valid: dict[tuple[Key, str], int]  # ((type, id), input URL) → 1: every id once
    refused: dict[str, int]  # input URL → refused lines

    def parameters(self) -> bytes:
        inputs = []
        for path, type_ in self.files:
            part: list[dict[str, str]] = [{"name": "url", "valueUri": path.as_uri()}]
            if type_:
                part.append({"name": "type", "valueCode": type_})
            inputs.append({"name": "input", "part": part})
        format_ = {"name": "inputFormat", "valueCode": "application/fhir+ndjson"}
        body = {"resourceType": "Parameters", "parameter": [format_, *inputs]}
        return json.dumps(body).encode()


def patient(n: int, rng: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"imp-pat-{n:05d}",
        "active": True,
        "gender": rng.choice(["female", "male", "other"]),
        "birthDate": f"{rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "name": [{"family": f"Family{rng.randint(0, 9999)}", "given": [f"Given{n}"]}],
        "address": [{"city": f"City{rng.randint(0, 500)}", "postalCode": f"{n:05d}"}],
    }


def observation(n: int, rng: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"imp-obs-{n:05d}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/imp-pat-{rng.randint(0, 2999):05d}"},
        "effectiveDateTime": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "valueQuantity": {"value": rng.randint(40, 180), "unit": "/min"},
    }


def encounter_or_condition(n: int, rng: random.Random) -> dict[str, Any]:
    subject = {"reference": f"Patient/imp-pat-{rng.randint(0, 2999):05d}"}
    if n % 2:
        return {
            "resourceType": "Encounter",
            "id": f"imp-enc-{n:05d}",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": subject,
            "period": {"start": f"2023-{rng.randint(1, 12):02d}-01T08:00:00Z"},
        }
    return {
        "resourceType": "Condition",
        "id": f"imp-con-{n:05d}",
        "code": {"text": f"condition {rng.randint(0, 300)}"},
        "subject": subject,
        "recordedDate": f"2022-{rng.randint(1, 12):02d}-15",
    }


def broken(kind: int, n: int, good: bytes, declared: str | None) -> bytes:
    """A line the import must refuse: malformed JSON, a wrong type, an invalid id."""
    if kind == 0:
        return good[: len(good) // 2]
    if kind == 1:  # in a typed input another type; in an untyped one, no FHIR type
        other = "Medication" if declared else "NotAResource"
        return json.dumps({"resourceType": other, "id": f"wrong-type-{n}"}).encode()
    return json.dumps({"resourceType": declared or "Encounter", "id": f"bad id {n}!"}).encode()


def write_inputs(root: Path, lines_per_file: int) -> ImportInputs:
    root.mkdir()
    rng = random.Random(RNG_SEED)
    makers = [("Patient", patient), ("Observation", observation), (None, encounter_or_condition)]
    files: list[tuple[Path, str | None]] = []
    valid: dict[tuple[Key, str], int] = {}
    refused: dict[str, int] = {}
    for declared, make in makers:
        path = root / f"{(declared or 'mixed').lower()}.ndjson"
        url = path.as_uri()
        refused[url] = 0
        lines = []
        for n in range(lines_per_file):
            resource = make(n, rng)
            good = json.dumps(resource, separators=(",", ":")).encode()
            if rng.random() < 0.04:
                lines.append(broken(n % 3, n, good, declared))
                refused[url] += 1
            else:
                lines.append(good)
                valid[((resource["resourceType"], resource["id"]), url)] = 1
            if rng.random() < 0.005:
                lines.append(b"")  # blank lines are skipped, neither stored nor refused
        path.write_bytes(b"\n".join(lines) + b"\n")
        files.append((path, declared))
    return ImportInputs(root, files, valid, refused)


def import_settings(inputs: ImportInputs, **overrides: str) -> dict[str, str]:
    """test_resilience's settings, 64 KiB batches, a checkpoint every 50 lines (SQLite
    commits them in groups of 100 rows or more), 1 KiB blocks."""
    return (
        settings(
            import_root=str(inputs.root),
            import_batch_bytes=str(IMPORT_BATCH_BYTES),
            import_lines_per_commit=str(LINES_PER_COMMIT),
            import_group_rows=str(GROUP_ROWS),
            block_bytes="1024",
        )
        | overrides
    )


def kick_off_import(api: LiveServer, inputs: ImportInputs) -> str:
    headers = {**ASYNC_HEADERS, "Content-Type": "application/fhir+json"}
    response = api.request("POST", "/$import", headers=headers, body=inputs.parameters())
    assert response.status == 202, (response.status, response.body[:500])
    location = response.headers["Content-Location"]
    assert location.startswith(api.url("/_operations/import/")), location
    return location


def batch_progress(row: dict[str, Any]) -> int | None:
    """Bytes of its batch a unit has read; None for the parent import (it reads nothing)."""
    record = row["record"]
    if record["kind"] != "import-batch":
        return None
    return int(record["offset"]) - int(record["start"])


def as_pages(units: Units) -> Events:
    """Import log lines with ``pages_read`` = ``offset - start`` of their batch."""
    starts = {u: int(r["record"]["start"]) for u, r in units.work().items()}

    def normalize(events: list[LogEvent]) -> list[LogEvent]:
        return [
            dataclasses.replace(
                e, fields={**e.fields, "pages_read": str(e.number("offset") - starts[job])}
            )
            if "offset" in e.fields and (job := e.fields.get("job")) in starts
            else e
            for e in events
        ]

    return normalize


def import_commit(before: LogEvent | None, started: LogEvent) -> bool:
    """At most one commit of lines. On SQLite a commit holds a group of checkpoints,
    logged once it has committed: a batch's part of it is under ``GROUP_ROWS`` lines
    plus its last block, and the batch may have one more block written into the next
    group, committed before the log lines of this one were written."""
    base = before.number("lines") if before is not None else 0
    return 0 < started.number("lines") - base <= GROUP_ROWS + 2 * LINES_PER_COMMIT


def versions(api: LiveServer) -> dict[Key, int]:
    """(type, id) → how many versions the store holds."""
    return api.store.version_counts()


def import_after_kill(api: LiveServer) -> AfterKill:
    """Each batch's error file holds what its record says is committed, and the store
    holds exactly the resources the records say they created (they are written in one
    transaction); remarkable: the worker held a batch it had read partly."""

    def check(rows: dict[str, dict[str, Any]], held: dict[str, tuple[int, int | None]]) -> bool:
        batches = {u: r["record"] for u, r in rows.items() if r["record"]["kind"] == "import-batch"}
        for unit, record in batches.items():
            sizes = file_sizes(api.data_dir / "output" / unit)
            for f in record["output"]:
                assert sizes.get(f["name"], -1) >= f["committed_bytes"], (unit, f, sizes)
        created = sum(r["created"] for r in batches.values())
        stored = sum(versions(api).values())
        assert stored == created, f"{stored} resources stored, the records say {created}"
        return any(
            at is not None and 0 < at < batches[u]["end"] - batches[u]["start"]
            for u, (_, at) in held.items()
        )

    return check


def assert_import_complete_and_valid(
    api: LiveServer, status_url: str, inputs: ImportInputs
) -> dict[str, Any]:
    """The manifest counts every valid and refused line; each resource stored once, in
    one version; the error files hold the refused lines; ``exportsvc validate`` agrees."""
    job = job_id_of(status_url)
    manifest: dict[str, Any] = api.wait_for_manifest(status_url, FINISH_SECONDS).json()
    output: dict[tuple[str, str], int] = {}
    for (key, url), _ in inputs.valid.items():
        output[(key[0], url)] = output.get((key[0], url), 0) + 1
    assert {(o["type"], o["inputUrl"]): o["count"] for o in manifest["output"]} == output
    refused: dict[str, int] = {}
    for entry in manifest["error"]:
        refused[entry["inputUrl"]] = refused.get(entry["inputUrl"], 0) + entry["count"]
        response = api.request("GET", entry["url"])
        assert response.status == 200, (entry, response.status)
        assert len(response.body.splitlines()) == entry["count"], entry
    assert refused == inputs.refused, (refused, inputs.refused)

    stored = versions(api)
    wanted = {key for key, _ in inputs.valid}
    extra, missing = set(stored) - wanted, wanted - set(stored)
    assert not extra and not missing, (sorted(extra)[:5], sorted(missing)[:5])
    repeated = {key: n for key, n in stored.items() if n != 1}
    assert not repeated, f"resources given once, stored in several versions: {repeated}"
    batches = [r["record"] for r in Units(api, job).work().values()]
    totals = {k: sum(b[k] for b in batches) for k in ("created", "updated", "unchanged", "errors")}
    assert totals == {
        "created": len(wanted),
        "updated": 0,
        "unchanged": 0,  # no committed line was read twice
        "errors": sum(inputs.refused.values()),
    }, totals
    result = api.validate(job)
    assert result.returncode == 0, result.stdout + result.stderr
    return manifest


@pytest.fixture
def import_inputs(tmp_path: Path) -> ImportInputs:
    return write_inputs(tmp_path / "inputs", lines_per_file=3000)


@pytest.fixture(params=["sqlite", "postgres"])
def import_store(request: pytest.FixtureRequest) -> str | None:
    """Where an import goes: a new SQLite store (None), or a new PostgreSQL database."""
    if request.param == "sqlite":
        return None
    databases: PostgresDatabases = request.getfixturevalue("postgres_databases")
    return databases(0)


def test_kill_9_loop_on_import(
    import_inputs: ImportInputs,
    import_store: str | None,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    options = import_settings(import_inputs, lease_seconds="1")
    api = api_on(start_exportsvc, tmp_path, import_store, **options)
    status_url = kick_off_import(api, import_inputs)
    units = Units(api, job_id_of(status_url))
    assert len(units.work()) > 3 * len(import_inputs.files), "too few batches"
    loop = KillLoop(api, units, start_worker, batch_progress, import_after_kill(api), 3)
    loop.run()
    assert loop.remarkable >= KILLS // 2, (
        f"only {loop.remarkable} of {KILLS} kills interrupted a batch midway (seed {RNG_SEED})"
    )
    final = start_worker(api)
    loop.workers.append(final)
    assert_import_complete_and_valid(api, status_url, import_inputs)
    assert final.stop() == 0, final.stderr()
    loop.assert_resumed(as_pages(units), import_commit)


def test_sigterm_drain_on_import(
    import_inputs: ImportInputs,
    import_store: str | None,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    # Batches of 64 KiB last some 50 ms: too short for a SIGTERM to find one midway.
    options = import_settings(import_inputs, import_batch_bytes=str(8 * IMPORT_BATCH_BYTES))
    api = api_on(start_exportsvc, tmp_path, import_store, **options)
    status_url = kick_off_import(api, import_inputs)
    units = Units(api, job_id_of(status_url))

    def advanced(e: LogEvent) -> bool:
        return units.of(e) and "lines" in e.fields and e.number("lines") > 0

    drain_then_resume(
        api,
        start_worker,
        status_url,
        units,
        advanced=advanced,
        progress=batch_progress,
        normalize=as_pages(units),
        complete=lambda: assert_import_complete_and_valid(api, status_url, import_inputs),
    )
