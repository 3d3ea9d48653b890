"""The core promise, with real processes on the filesystem destination (DESIGN.md 4, 6).

An export survives ``kill -9`` of its worker at any moment and resumes from its last
checkpoint; SIGTERM and ``POST /_admin/drain`` hand it back to the queue within seconds;
a stalled worker that lost its lease cannot write beside the new owner and stops without
persisting anything when it wakes; a paused job stays paused across a server restart.
Every export ends with ``exportsvc validate`` and a look at the output folder.

A *unit* is a leased record that does export work: the export itself, or each of its
work items (records whose ``parent_id`` is the export) when the service splits it.
Workers log ``job.started job=U version=V pages_read=N`` when they (re)start a unit and
``job.checkpoint job=U version=V pages_read=M`` after each checkpoint. ``V`` is the
unit's lease version, bumped by every acquisition and fencing every record write, so it
orders a unit's leases across processes: a start with version ``V`` must resume from
the highest checkpoint logged under a lower version.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    LiveServer,
    LiveWorker,
    LogEvent,
    ServerFactory,
    WorkerFactory,
    job_id_of,
    wait_until,
)

pytestmark = pytest.mark.acceptance

TYPES = ("Patient", "Encounter", "Observation", "Condition")
EXPORT_PATH = "/$export?_type=" + ",".join(TYPES)
COMMIT_EVERY_PAGES = 3
MAX_FILE_BYTES = 200_000
# Kill timings are drawn from this seed; set RESILIENCE_SEED to replay another run.
RNG_SEED = int(os.environ.get("RESILIENCE_SEED", "20261122"))
KILLS = 22
DRAIN_BUDGET_SECONDS = 5.0
FINISH_SECONDS = 90.0
LOCKED = "locked by another worker"
TROUBLE = ("job.retriable", "job.failed", "job.crashed", "job.lease_lost")


def settings(**overrides: str) -> dict[str, str]:
    """Small pages and files, a checkpoint every 3 pages (never by time), fast retries."""
    base = {
        "max_file_bytes": str(MAX_FILE_BYTES),
        "page_size": "10",
        "commit_every_pages": str(COMMIT_EVERY_PAGES),
        "commit_interval_seconds": "3600",
        "poll_interval_seconds": "0.05",
        "retry_base_seconds": "0.2",
        "retry_max_seconds": "0.5",
        "max_restarts": "1000",
    }
    return base | overrides


def fresh_data(template: Path, tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    shutil.copytree(template, data_dir)
    return data_dir


def output_folder(server: LiveServer, job: str) -> Path:
    return server.data_dir / "output" / job


def file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())} if folder.exists() else {}


class Units:
    """The ids of an export and of its work items, re-read from the store on a miss."""

    def __init__(self, server: LiveServer, job: str) -> None:
        self.store, self.job, self.ids = server.store, job, {job}

    def __contains__(self, unit: object) -> bool:
        if unit not in self.ids:
            self.ids = set(self.store.units(self.job))
        return unit in self.ids

    def rows(self) -> dict[str, dict[str, Any]]:
        rows = self.store.units(self.job)
        self.ids = set(rows)
        return rows

    def work(self) -> dict[str, dict[str, Any]]:
        """The rows that read and write: the work items if it has some, else the export."""
        rows = self.rows()
        return {u: r for u, r in rows.items() if u != self.job} or rows

    def of(self, event: LogEvent) -> bool:
        return event.fields.get("job") in self


def paged(event: LogEvent) -> bool:
    """A line about reading pages (not, say, the planning of an export into items)."""
    return "pages_read" in event.fields and "version" in event.fields


def progressed(units: Units) -> Callable[[LogEvent], bool]:
    """A checkpoint past the first page of some unit of the export."""
    return lambda e: paged(e) and e.number("pages_read") > 0 and units.of(e)


def of_units(logs: Iterable[Iterable[LogEvent]], units: Units, *names: str) -> list[LogEvent]:
    return [e for log in logs for e in log if e.event in names and units.of(e)]


def owner_of(worker: LiveWorker) -> str:
    """The name the worker takes leases under (``lease_owner``)."""
    return worker.wait_for("worker.started").fields["worker"]


def troubles(logs: Iterable[list[LogEvent]], units: Units) -> list[LogEvent]:
    """Failure and lost-lease lines about the export's units, less one benign race.

    A heartbeat that ticks after the task saved its unit ``completed`` (while it still
    finalizes) reports ``job.lease_lost`` right before that worker's ``job.completed``.
    """
    found = []
    for log in logs:
        mine = [e for e in log if units.of(e)]
        for i, e in enumerate(mine):
            if e.event not in TROUBLE:
                continue
            after = next((n for n in mine[i + 1 :] if n.fields["job"] == e.fields["job"]), None)
            if e.event == "job.lease_lost" and after is not None and after.event == "job.completed":
                continue
            found.append(e)
    return found


@dataclass(frozen=True)
class Mismatch:
    started: LogEvent
    expected: int
    source: LogEvent | None

    def __str__(self) -> str:
        return f"{self.started}\n    expected pages_read={self.expected} from {self.source}"


def resume_mismatches(events: list[LogEvent]) -> list[Mismatch]:
    """Each ``job.started`` must resume from the last checkpoint of an earlier lease.

    Checkpoints persisted under lease version ``v`` of a unit all happened before its
    acquisition with version ``V > v`` (record writes are fenced by the version), so a
    start with version ``V`` must report the highest ``pages_read`` checkpointed under a
    lower one.
    """
    checkpoints = [e for e in events if e.event == "job.checkpoint" and paged(e)]
    mismatches = []
    for e in events:
        if e.event != "job.started" or not paged(e):
            continue
        earlier = [
            c
            for c in checkpoints
            if c.fields["job"] == e.fields["job"] and c.number("version") < e.number("version")
        ]
        source = max(earlier, key=lambda c: c.number("pages_read"), default=None)
        expected = source.number("pages_read") if source is not None else 0
        if e.number("pages_read") != expected:
            mismatches.append(Mismatch(e, expected, source))
    return mismatches


def next_checkpoint(last_logged: int, at: int, pages: int = COMMIT_EVERY_PAGES) -> bool:
    """Whether ``at`` can be the checkpoint after one at ``last_logged``.

    A kill between a checkpoint's save and its log line leaves that checkpoint unlogged,
    and the next start resumes it: one commit interval of ``pages`` past the last logged
    one, or sooner when it was an item's last checkpoint, after its final (possibly
    empty) page.
    """
    return last_logged < at <= last_logged + pages


def starts_by_unit(events: Iterable[LogEvent]) -> dict[str, list[LogEvent]]:
    """``job.started`` lines that read pages, per unit, in lease order."""
    starts: dict[str, list[LogEvent]] = {}
    for e in events:
        if e.event == "job.started" and paged(e):
            starts.setdefault(e.fields["job"], []).append(e)
    return {u: sorted(s, key=lambda e: e.number("version")) for u, s in starts.items()}


def stop_points(events: Iterable[LogEvent], units: Units, stop: str) -> dict[str, int]:
    """Unit → ``pages_read`` of its last checkpoint before ``stop`` (``job.drained``...)."""
    last: dict[str, int] = {}
    stopped: dict[str, int] = {}
    for e in events:
        if not units.of(e):
            continue
        if e.event == "job.checkpoint" and paged(e):
            last[e.fields["job"]] = e.number("pages_read")
        elif e.event == stop and e.fields["job"] in last:
            stopped[e.fields["job"]] = last[e.fields["job"]]
    return stopped


def assert_resumed_at(events: Iterable[LogEvent], points: dict[str, int]) -> None:
    """The next start of each unit in ``points`` resumed exactly there."""
    starts = starts_by_unit(events)
    for unit, at in points.items():
        resumed = starts.get(unit, [])
        assert resumed, f"{unit} was never started again"
        assert resumed[0].number("pages_read") == at, (str(resumed[0]), at)


def assert_complete_and_valid(server: LiveServer, status_url: str) -> dict[str, Any]:
    """Manifest, output folder and ``exportsvc validate`` agree with each other and the store."""
    job = job_id_of(status_url)
    manifest: dict[str, Any] = server.wait_for_manifest(status_url, timeout=FINISH_SECONDS).json()
    names = {entry["url"].rsplit("/", 1)[-1] for entry in manifest["output"]}
    sizes = file_sizes(output_folder(server, job))
    on_disk = {name for name in sizes if not name.startswith(".lock")}
    assert on_disk == names, f"files on disk but not listed: {sorted(on_disk - names)[:10]}"
    too_big = {n: s for n, s in sizes.items() if s > MAX_FILE_BYTES}
    assert not too_big, too_big
    observation = [e for e in manifest["output"] if e["type"] == "Observation"]
    assert len(observation) >= 3, f"Observation should span several files: {observation}"
    expected = len(server.store.current(TYPES))
    assert sum(e["count"] for e in manifest["output"]) == expected
    result = server.validate(job)
    assert result.returncode == 0, result.stdout + result.stderr
    return manifest


# -- 1. kill -9, over and over -----------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    worker: str
    held: dict[str, tuple[int, int | None]]  # unit → (lease version, pages_read) it held


def test_kill_9_loop_resumes_from_the_last_checkpoint(
    large_seeded_template: Path,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    # One resource a page, so the export outlasts the kill loop; 1 KiB blocks, so bytes
    # reach the files between commits (a restart must drop them).
    api = start_exportsvc.api_only(
        fresh_data(large_seeded_template, tmp_path),
        **settings(page_size="1", block_bytes="1024", lease_seconds="1"),
    )
    status_url = api.kick_off("GET", EXPORT_PATH)
    job = job_id_of(status_url)
    units = Units(api, job)
    folder = output_folder(api, job)
    rng = random.Random(RNG_SEED)
    workers: list[LiveWorker] = []
    kills: list[Kill] = []
    dirty_kills = 0  # kills that left bytes past the last checkpoint on disk
    for n in range(1, KILLS + 1):
        worker = start_worker(api)
        workers.append(worker)
        owner = owner_of(worker)
        if rng.random() < 0.2:  # while connecting and restoring the files
            worker.wait_for("job.acquired", units.of)
            time.sleep(rng.uniform(0.0, 0.02))
        else:  # between pages, mid-write, between a commit and its checkpoint
            worker.wait_for("job.started", units.of)
            time.sleep(rng.uniform(0.05, 0.6))
        assert worker.running, f"{worker.name} exited early:\n{worker.stderr()}"
        worker.kill()
        rows = units.rows()
        assert rows[job]["status"] != "completed", (
            f"the export finished after only {n} of {KILLS} kills: make it longer (seed {RNG_SEED})"
        )
        held = {
            u: (r["lease_version"], r["record"].get("pages_read"))
            for u, r in rows.items()
            if r["status"] == "running" and r["lease_owner"] == owner
        }
        kills.append(Kill(worker.name, held))
        # What a record says is committed is on disk: the commit preceded the save.
        sizes = file_sizes(folder)
        committed = {
            f["name"]: f["committed_bytes"]
            for r in rows.values()
            for f in r["record"].get("output", [])
        }
        for name, length in committed.items():
            assert sizes.get(name, -1) >= length, (name, length, sizes.get(name), worker.name)
        dirty_kills += any(
            size > committed.get(name, 0)
            for name, size in sizes.items()
            if not name.startswith(".lock")
        )
    assert dirty_kills >= KILLS // 5, (
        f"only {dirty_kills} kills left uncommitted bytes on disk: restore is barely exercised"
    )

    final = start_worker(api, page_size="10")  # resumes by continuation point, not page
    workers.append(final)
    assert_complete_and_valid(api, status_url)
    assert final.stop() == 0, final.stderr()

    logs = [w.log.events() for w in workers]
    lifecycle = of_units(logs, units, "job.started", "job.checkpoint")
    starts = starts_by_unit(lifecycle)
    # The record is authoritative: the next start of every unit a killed worker held
    # resumed exactly what the record held right after the kill.
    for kill in kills:
        for unit, (version, pages_read) in kill.held.items():
            if pages_read is None:  # not a reading unit (the planning of the export)
                continue
            later = [s for s in starts.get(unit, []) if s.number("version") > version]
            assert later, f"{unit}, held by {kill.worker} when killed, never started again"
            assert later[0].number("pages_read") == pages_read, (str(later[0]), kill)
    # A start past the last logged checkpoint resumed an unlogged one: the next checkpoint
    # after it, and what the record held after a kill (checked above).
    mismatches = resume_mismatches(lifecycle)
    unlogged = [
        m
        for m in mismatches
        if any(
            kill.held.get(m.started.fields["job"], (0, None))[1] == m.started.number("pages_read")
            and next_checkpoint(m.expected, m.started.number("pages_read"))
            for kill in kills
        )
    ]
    assert len(unlogged) == len(mismatches), (
        f"restarts not from the last checkpoint (seed {RNG_SEED}):\n"
        + "\n".join(map(str, mismatches))
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

    # One restart per unit a kill interrupted, and nothing else: no extra acquisitions,
    # no failures, no lost leases.
    expected = sum(len(kill.held) for kill in kills)
    acquired = of_units(logs, units, "job.acquired")
    extra_acquisitions = len(acquired) - len({e.fields["job"] for e in acquired})
    trouble = troubles(logs, units)
    view = api.admin_job(job)
    assert view["status"] == "completed", f"admin view: {view}"
    shown = "\n".join(map(str, trouble[:12])) + ("\n..." if len(trouble) > 12 else "")
    assert (view["restartCount"], extra_acquisitions) == (expected, expected), (
        f"{KILLS} kills interrupted {expected} leases: that should make {expected} restarts "
        f"and re-acquisitions, not {view['restartCount']} and {extra_acquisitions}; "
        f"{len(trouble)} unexpected events:\n{shown}"
    )
    assert view["failureCount"] == 0 and not trouble, shown


# -- a live worker keeps its lease --------------------------------------------------------


def test_a_live_worker_keeps_its_lease(
    large_seeded_template: Path,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    """No crash, one worker, an export lasting several 1 s leases: it is never restarted.

    The heartbeat renews the lease every third of it; nothing may undo that renewal, or
    the worker's own job expires under it and is acquired again (here, by itself).
    """
    lease = 1.0
    api = start_exportsvc.api_only(
        fresh_data(large_seeded_template, tmp_path),
        **settings(page_size="5", lease_seconds=str(lease)),
    )
    status_url = api.kick_off("GET", EXPORT_PATH)
    units = Units(api, job_id_of(status_url))
    worker = start_worker(api)
    started = time.monotonic()
    assert_complete_and_valid(api, status_url)
    took = time.monotonic() - started
    assert worker.stop() == 0, worker.stderr()
    assert took > 3 * lease, f"the export took {took:.1f}s: too short to outlive a lease"

    logs = [worker.log.events()]
    acquired = of_units(logs, units, "job.acquired")
    trouble = troubles(logs, units)
    view = api.admin_job(units.job)
    shown = "\n".join(map(str, (acquired + trouble)[:12]))
    assert len(acquired) == len({e.fields["job"] for e in acquired}), (
        f"a live worker's job was acquired again (restartCount {view['restartCount']}):\n{shown}"
    )
    assert (view["restartCount"], view["failureCount"], trouble) == (0, 0, []), shown


# -- 2. SIGTERM: drain -------------------------------------------------------------------


@dataclass
class StatusPoller:
    """Polls a status URL from a thread as fast as it answers: (start time, status, X-Progress)."""

    server: LiveServer
    status_url: str
    polls: list[tuple[float, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            response = self.server.request("GET", self.status_url)
            self.polls.append((started, response.status, response.headers["X-Progress"] or ""))
            time.sleep(0.002)

    @contextmanager
    def running(self) -> Iterator[StatusPoller]:
        thread = threading.Thread(target=self._run, name="status-poller", daemon=True)
        thread.start()
        wait_until(lambda: self.polls, "a first status poll", timeout=10)
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=15)


def assert_handed_back(units: Units, stopped: dict[str, int], status: str) -> None:
    """Every unfinished unit waits, unleased and unfailed; the stopped ones at their checkpoint."""
    assert stopped, "no unit was stopped at a checkpoint"
    for unit, row in units.work().items():
        if row["status"] == "completed":
            continue
        record = row["record"]
        state = (row["status"], row["lease_owner"], record["failure_count"], record["last_error"])
        assert state in ((status, None, 0, None), ("queued", None, 0, None)), (unit, state)
        if unit in stopped:
            assert row["status"] == status, (unit, state)
            assert record["pages_read"] == stopped[unit], (unit, record["pages_read"], stopped)


def test_sigterm_drains_the_worker_and_another_resumes(
    large_seeded_template: Path,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    api = start_exportsvc.api_only(fresh_data(large_seeded_template, tmp_path), **settings())
    status_url = api.kick_off("GET", EXPORT_PATH)
    job = job_id_of(status_url)
    units = Units(api, job)
    first = start_worker(api)  # default drain grace
    first.wait_for("job.checkpoint", progressed(units))
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

    drained = stop_points(first.log.events(), units, "job.drained")
    assert_handed_back(units, drained, "queued")
    view = api.admin_job(job)
    assert (view["status"], view["leaseOwner"]) == ("queued", None), f"admin view: {view}"
    assert view["resourcesDone"] > 0 and view["failureCount"] == 0, f"admin view: {view}"
    assert view["resourcesDone"] < view["resourcesTotal"], "drained too late: it was done"

    second = start_worker(api)
    assert_complete_and_valid(api, status_url)
    assert second.stop() == 0, second.stderr()
    assert_resumed_at(of_units([second.log.events()], units, "job.started"), drained)


# -- 3. a stalled worker (SIGSTOP) past its lease ------------------------------------------


def stall(worker: LiveWorker, units: Units, attempts: int = 50) -> tuple[str, dict[str, Any]]:
    """SIGSTOP ``worker`` while it holds a unit past its first page, and no database lock.

    A process stalled inside a write transaction blocks other writers (that is the
    database, not the lease protocol under test), so stop it between transactions
    (``Store.write_locked``). Returns the unit it holds and that unit's row.
    """
    owner = owner_of(worker)
    for _ in range(attempts):
        worker.signal(signal.SIGSTOP)
        wait_until(lambda: worker.state() == "T", f"{worker.name} to stop", timeout=10)
        if not units.store.write_locked():
            held = {
                u: r
                for u, r in units.work().items()
                if r["status"] == "running"
                and r["lease_owner"] == owner
                and r["record"].get("pages_read", 0) > 0
            }
            if len(held) == 1:
                return next(iter(held.items()))
        worker.signal(signal.SIGCONT)
        wait_until(lambda: worker.state() not in ("T", ""), f"{worker.name} to run", timeout=10)
        time.sleep(0.01)
    pytest.fail(f"{worker.name} never stopped outside a database write holding one unit")


def stalled_settings(**overrides: str) -> dict[str, str]:
    """One job at a time per worker (the stalled one holds exactly one unit), a 1 s lease,
    and retries that never give up."""
    return settings(lease_seconds="1", max_failures="1000", worker_concurrency="1") | overrides


@dataclass(frozen=True)
class Stalled:
    """A worker SIGSTOPped past its lease, holding ``unit`` as its row ``row`` says."""

    zombie: LiveWorker
    unit: str
    row: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.row["lease_version"])

    @property
    def at(self) -> int:
        return int(self.row["record"]["pages_read"])


def stall_past_its_lease(api: LiveServer, start_worker: WorkerFactory, units: Units) -> Stalled:
    """A worker that checkpointed some pages of the export, stopped (SIGSTOP) outside any
    database transaction, until its lease has expired."""
    zombie = start_worker(api)
    zombie.wait_for("job.checkpoint", progressed(units))
    unit, row = stall(zombie, units)
    wait_until(
        lambda: (units.store.job(unit)["lease_expires"] or 0) < time.time() - 0.1,
        "the stalled worker's lease to expire",
        timeout=10,
    )
    return Stalled(zombie, unit, row)


def assert_woke_and_wrote_nothing(
    stalled: Stalled, others: list[LiveWorker], units: Units, *, logged: LogEvent
) -> None:
    """After the job finished: the stalled worker, woken, logged ``logged`` (its lease
    lost) and persisted nothing under its old lease; every start resumed the last
    checkpoint, and the new owner's first start resumed where the stalled one stopped."""
    zombie, unit, version, at = stalled.zombie, stalled.unit, stalled.version, stalled.at
    assert logged.event == "job.lease_lost", logged
    for worker in (zombie, *others):
        assert worker.stop() == 0, worker.stderr()
    late = zombie.log.events(
        "job.checkpoint", lambda e: e.number("pages_read") > at, job=unit, version=str(version)
    )
    assert not late, "\n".join(map(str, late))
    logs = [zombie.log.events(), *(w.log.events() for w in others)]
    lifecycle = of_units(logs, units, "job.started", "job.checkpoint")
    mismatches = resume_mismatches(lifecycle)
    assert not mismatches, "\n".join(map(str, mismatches))
    later = [s for s in starts_by_unit(lifecycle)[unit] if s.number("version") > version]
    assert later and later[0].number("pages_read") == at, (later[:1], at)


def stalled_worker_on_the_filesystem(
    api: LiveServer, start_worker: WorkerFactory, status_url: str
) -> None:
    """The stalled worker still holds its files' ``flock``: the new owner is refused
    (``retriable``, "locked by another worker") and keeps trying without writing a byte;
    woken, the stalled worker finds its lease gone and stops; the new owner finishes."""
    job = job_id_of(status_url)
    units = Units(api, job)
    folder = output_folder(api, job)
    stalled = stall_past_its_lease(api, start_worker, units)
    unit = stalled.unit
    sizes = file_sizes(folder)

    second = start_worker(api)

    def refused() -> dict[str, Any] | None:
        row = api.store.job(unit)
        error = row["record"]["last_error"] or ""
        return row if row["status"] == "retriable" and LOCKED in error else None

    assert wait_until(refused, f"{unit} to become retriable: {LOCKED}", timeout=30)
    view = api.admin_job(job)
    assert view["failureCount"] >= 1 and view["restartCount"] >= 1, f"admin view: {view}"
    assert LOCKED in (view["lastError"] or ""), f"admin view: {view}"
    wait_until(  # and it keeps trying
        lambda: api.store.job(unit)["record"]["failure_count"] >= 2, "a second refusal", 30
    )
    second.wait_for("job.retriable", job=unit)
    assert not second.log.events("job.started", job=unit), "it started beside the stalled one"
    assert api.store.job(unit)["record"]["pages_read"] == stalled.at
    changed = {n: (s, file_sizes(folder).get(n)) for n, s in sizes.items()}
    changed = {n: v for n, v in changed.items() if v[0] != v[1]}
    assert not changed, f"files changed while their owner was stalled: {changed}"

    stalled.zombie.signal(signal.SIGCONT)
    logged = stalled.zombie.wait_for("job.lease_lost", job=unit)
    assert_complete_and_valid(api, status_url)
    assert_woke_and_wrote_nothing(stalled, [second], units, logged=logged)


def test_a_stalled_worker_cannot_write_beside_the_new_owner(
    large_seeded_template: Path,
    tmp_path: Path,
    start_exportsvc: ServerFactory,
    start_worker: WorkerFactory,
) -> None:
    api = start_exportsvc.api_only(
        fresh_data(large_seeded_template, tmp_path), **stalled_settings()
    )
    status_url = api.kick_off("GET", EXPORT_PATH)
    stalled_worker_on_the_filesystem(api, start_worker, status_url)


# -- 4. pause and resume over HTTP, across a server restart -------------------------------


def test_a_paused_export_stays_paused_across_a_restart(
    large_seeded_template: Path, tmp_path: Path, start_exportsvc: ServerFactory
) -> None:
    data_dir = fresh_data(large_seeded_template, tmp_path)
    # A 3 s lease: the heartbeat (every second) brings the pause request to the task.
    options = settings(lease_seconds="3")
    server = start_exportsvc(data_dir, **options)
    status_url = server.kick_off("GET", EXPORT_PATH)
    job = job_id_of(status_url)
    units = Units(server, job)
    server.log.wait_for("job.checkpoint", progressed(units), process=server.process)

    response = server.request("POST", f"/_admin/jobs/{job}/pause")
    assert response.status == 202, response.body

    def stopped() -> bool:
        running = [r for r in units.work().values() if r["status"] == "running"]
        return not running and bool(server.log.events("job.paused", units.of))

    wait_until(stopped, "the running parts of the export to pause", timeout=30)
    paused = stop_points(server.log.events(), units, "job.paused")
    assert_handed_back(units, paused, "paused")
    view = server.admin_job(job)
    assert (view["status"], view["leaseOwner"]) == ("paused", None), f"admin view: {view}"
    assert view["pauseRequested"] and 0 < view["resourcesDone"] < view["resourcesTotal"], (
        f"admin view: {view}"
    )

    def assert_paused_for_clients(server: LiveServer) -> None:
        status = server.request("GET", server.rebase(status_url))
        assert status.status == 202, status.body
        assert (status.headers["X-Progress"] or "").startswith("paused"), status.headers

    assert_paused_for_clients(server)
    assert server.stop() == 0, server.stderr()

    restarted = start_exportsvc(data_dir, **options)
    status_url = restarted.rebase(status_url)
    view = restarted.admin_job(job)
    assert (view["status"], view["leaseOwner"]) == ("paused", None), f"admin view: {view}"
    # The worker is running (a newer export completes) and leaves the paused one alone.
    other = restarted.kick_off("GET", "/$export?_type=Patient")
    restarted.wait_for_manifest(other)
    assert restarted.admin_job(job)["status"] == "paused"
    assert not restarted.log.events("job.acquired", units.of), "the paused export was acquired"
    assert_handed_back(units, paused, "paused")
    assert_paused_for_clients(restarted)

    response = restarted.request("POST", f"/_admin/jobs/{job}/resume")
    assert response.status == 202, response.body
    assert_complete_and_valid(restarted, status_url)
    assert_resumed_at(of_units([restarted.log.events()], units, "job.started"), paused)


# -- 5. POST /_admin/drain ---------------------------------------------------------------


def test_admin_drain_stops_the_server_and_a_restart_finishes(
    large_seeded_template: Path, tmp_path: Path, start_exportsvc: ServerFactory
) -> None:
    data_dir = fresh_data(large_seeded_template, tmp_path)
    server = start_exportsvc(data_dir, **settings())
    status_url = server.kick_off("GET", EXPORT_PATH)
    job = job_id_of(status_url)
    units = Units(server, job)
    server.log.wait_for("job.checkpoint", progressed(units), process=server.process)

    asked = time.monotonic()
    response = server.request("POST", "/_admin/drain")
    assert response.status == 202, response.body
    code = server.process.wait(timeout=60)
    took = time.monotonic() - asked
    assert code == 0, server.stderr()
    assert took < DRAIN_BUDGET_SECONDS, f"the drain took {took:.2f}s"

    drained = stop_points(server.log.events(), units, "job.drained")
    assert_handed_back(units, drained, "queued")
    look = start_exportsvc.api_only(data_dir, **settings())  # the admin view, no worker
    view = look.admin_job(job)
    assert (view["status"], view["leaseOwner"]) == ("queued", None), f"admin view: {view}"
    assert view["failureCount"] == 0 and 0 < view["resourcesDone"] < view["resourcesTotal"], (
        f"admin view: {view}"
    )
    assert look.stop() == 0, look.stderr()

    restarted = start_exportsvc(data_dir, **settings())
    assert_complete_and_valid(restarted, restarted.rebase(status_url))
    assert_resumed_at(of_units([restarted.log.events()], units, "job.started"), drained)
