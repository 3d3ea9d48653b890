"""$import over a real port, on SQLite and on PostgreSQL: round trip, broken lines,
duplicates, bad requests, cancel, http inputs, retry of failed batches, a crash mid-batch."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from datastore.resources import ResourceStore
from exportsvc.api.keys import DESTINATIONS, OPERATIONS, RESOURCES, SECRETS
from exportsvc.errors import WritesLost
from exportsvc.import_task import ImportBatchTask
from exportsvc.preparer import PREPARER
from exportsvc.records import ImportBatchRecord, ImportJobRecord, JobStatus, utcnow
from exportsvc.settings import Settings
from exportsvc.sources import SourceReader
from exportsvc.validator import ValidationReport, validate_import
from tests.integration.conftest import a_postgres_database
from tests.integration.test_api import ASYNC, finished, outcome, serve

PREFER = {"Prefer": "respond-async", "Content-Type": "application/fhir+json"}


@pytest.fixture(params=["sqlite", "postgres"])
async def settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """Every test here on SQLite and on PostgreSQL (both stores in a new database)."""
    if request.param == "sqlite":
        return settings
    return settings.model_copy(update={"database_url": await a_postgres_database(request)})


def parameters(*urls: str, type_: str | None = None, mode: str | None = None) -> bytes:
    params: list[dict[str, Any]] = [{"name": "inputFormat", "valueCode": "application/fhir+ndjson"}]
    if mode:
        params.append({"name": "mode", "valueCode": mode})
    for url in urls:
        part: list[dict[str, Any]] = [{"name": "url", "valueUri": url}]
        if type_:
            part.append({"name": "type", "valueCode": type_})
        params.append({"name": "input", "part": part})
    return orjson.dumps({"resourceType": "Parameters", "parameter": params})


async def start_import(session: ClientSession, body: bytes) -> str:
    async with session.post("/$import", data=body, headers=PREFER) as response:
        assert response.status == 202, await response.text()
        location = response.headers["Content-Location"]
    assert "/_operations/import/" in location
    return location


async def validate(server: TestServer, status_url: str) -> ValidationReport:
    app = server.app
    parent = await app[OPERATIONS].get(status_url.rsplit("/", 1)[1])
    assert isinstance(parent, ImportJobRecord)
    batches = [
        b for b in await app[OPERATIONS].children(parent.id) if isinstance(b, ImportBatchRecord)
    ]
    sources = SourceReader(server.app[DESTINATIONS].settings, app[DESTINATIONS])
    try:
        return await validate_import(
            parent,
            batches,
            app[RESOURCES],
            sources,
            lambda b, name: app[DESTINATIONS].for_job(b.id, None).read(name),
            max_line_bytes=app[DESTINATIONS].settings.import_max_line_bytes,
        )
    finally:
        await sources.close()


def importer(settings: Settings, root: Path, **more: Any) -> Settings:
    return settings.model_copy(
        update={
            "data_dir": settings.data_dir.parent / "importer",
            "import_root": root,
            "import_batch_bytes": 1024,
            "import_lines_per_commit": 7,
            **more,
        }
    )


async def versions(store: ResourceStore) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    async for v in store.scan_versions():
        counts[(v.type, v.id)] = counts.get((v.type, v.id), 0) + 1
    return counts


def without_meta(line: bytes) -> dict[str, Any]:
    resource = orjson.loads(line)
    resource.pop("meta", None)
    return dict(resource)


async def test_round_trip_export_import_export(settings: Settings) -> None:
    async with serve(settings, with_worker=True, patients=8) as (_, session):
        async with session.get("/$export", headers=ASYNC) as response:
            status_url = response.headers["Content-Location"]
        _, manifest = await finished(session, status_url)
        root = settings.output_root
        files = [root / f["url"].split("/_output/", 1)[1] for f in manifest["output"]]
        originals = {
            (r["resourceType"], r["id"]): r
            for path in files
            for r in map(without_meta, path.read_bytes().splitlines())
        }

    async with serve(importer(settings, root), with_worker=True, patients=0) as (target, client):
        status_url = await start_import(client, parameters(*(p.as_uri() for p in files)))
        _, result = await finished(client, status_url)
        assert result["error"] == []
        assert sum(o["count"] for o in result["output"]) == len(originals)
        assert {o["inputUrl"] for o in result["output"]} == {p.as_uri() for p in files}
        report = await validate(target, status_url)
        assert report.ok, report.render()
        parent = await target.app[OPERATIONS].get(status_url.rsplit("/", 1)[1])
        assert isinstance(parent, ImportJobRecord) and parent.batch_count > len(files)

        async with client.get("/$export", headers=ASYNC) as response:
            again_url = response.headers["Content-Location"]
        _, again = await finished(client, again_url)
        exported_again = {}
        for f in again["output"]:
            async with client.get(f["url"], headers={"Accept-Encoding": "identity"}) as response:
                for line in (await response.read()).splitlines():
                    resource = without_meta(line)
                    exported_again[(resource["resourceType"], resource["id"])] = resource
        assert exported_again == originals
        assert set((await versions(target.app[RESOURCES])).values()) == {1}


BROKEN = [
    (b'{"resourceType":"Patient","id":"p1","gender":"female"}', None),
    (b'{"resourceType":"Patient","id":"p2"', "not valid JSON"),
    (b"", None),  # blank lines are skipped, not refused
    (
        b'{"resourceType":"Observation","id":"o1","status":"final"}',
        "a Observation in an input of type Patient",
    ),
    (b'{"resourceType":"Patient","id":"bad id!"}', "invalid id"),
    (b'{"resourceType":"Patient","id":"dup","gender":"male"}', None),
    (b'["not","an","object"]', "not a JSON object"),
    (
        b'{"resourceType":"Patient","id":"long","text":"' + b"x" * 400 + b'"}',
        "longer than 300 bytes",
    ),
    (b'{"resourceType":"Nope","id":"n1"}', "unknown resourceType"),
    (b'{"resourceType":"Patient","id":"dup","gender":"female"}', None),
    (b'{"resourceType":"Patient","id":"p3"}', None),
    (b'{"resourceType":"Patient","id":"dup","gender":"other"}', None),
]


async def test_broken_lines_are_reported_exactly(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    lines = [line for line, _ in BROKEN] * 3  # long enough to span several batches
    path = root / "patients.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = []
    offset = 0
    for number, line in enumerate(lines, start=1):
        reason = BROKEN[(number - 1) % len(BROKEN)][1]
        if reason:
            expected.append((number, offset, reason))
        offset += len(line) + 1
    update = {"import_batch_bytes": 500, "import_max_line_bytes": 300}
    async with serve(importer(settings, root, **update), with_worker=True, patients=0) as (
        server,
        client,
    ):
        status_url = await start_import(client, parameters(path.as_uri(), type_="Patient"))
        _, manifest = await finished(client, status_url)
        reported = []
        for error in manifest["error"]:
            assert error["inputUrl"] == path.as_uri()
            async with client.get(
                error["url"], headers={"Accept-Encoding": "identity"}
            ) as response:
                assert response.status == 200
                for line in (await response.read()).splitlines():
                    issue = orjson.loads(line)["issue"][0]
                    assert issue["severity"] == "error"
                    reported.append(issue["diagnostics"])
        assert sum(e["count"] for e in manifest["error"]) == len(expected)
        assert sorted(reported, key=_line_number) == [
            f"input {path.as_uri()} line {n} (byte offset {o}): " + _reason_text(r, reported, n)
            for n, o, r in expected
        ]
        store = server.app[RESOURCES]
        dup = await store.read("Patient", "dup")
        assert dup is not None and dup["gender"] == "other", "the last line of an id wins"
        patients = next(o for o in manifest["output"] if o["type"] == "Patient")
        assert patients["count"] == 15  # valid lines
        report = await validate(server, status_url)
        assert report.ok, report.render()


def _line_number(text: str) -> int:
    return int(text.split(" line ", 1)[1].split(" ", 1)[0])


def _reason_text(fragment: str, reported: list[str], number: int) -> str:
    """The full reason of line ``number``, checked to contain ``fragment``."""
    text = next(t for t in reported if _line_number(t) == number)
    reason = text.split("): ", 1)[1]
    assert fragment in reason, (number, reason)
    return reason


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{", "not valid JSON"),
        (b'{"resourceType":"Patient"}', "Parameters"),
        (parameters(), "no input"),
        (parameters("file:///etc/passwd"), "outside the import root"),
        (parameters("http://169.254.169.254/latest/meta-data"), "not on the import allowlist"),
        (parameters("ftp://example.org/x.ndjson"), "only file, http and https"),
        (parameters("file:///nope.ndjson", mode="Sideways"), "mode 'Sideways'"),
        (parameters("MISSING"), "cannot be read"),
        (parameters("ETAG"), "etag"),
        (parameters("GOOD", type_="Nope"), "type 'Nope'"),
    ],
)
async def test_bad_import_requests_queue_nothing(
    settings: Settings, tmp_path: Path, body: bytes, named: str
) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    good = root / "good.ndjson"
    good.write_bytes(b'{"resourceType":"Patient","id":"a"}\n')
    body = body.replace(b'"MISSING"', orjson.dumps((root / "missing.ndjson").as_uri()))
    body = body.replace(b'"GOOD"', orjson.dumps(good.as_uri()))
    if b'"ETAG"' in body:
        body = orjson.dumps(
            {
                "inputFormat": "application/fhir+ndjson",
                "input": [{"type": "Patient", "url": good.as_uri(), "etag": "W/stale"}],
            }
        )
    async with serve(importer(settings, root), with_worker=False, patients=0) as (server, client):
        async with client.post("/$import", data=body, headers=PREFER) as response:
            assert response.status == 400, await response.text()
            assert named in await outcome(response)
        async with client.post("/$import", data=parameters(good.as_uri())) as response:
            assert response.status == 400  # no Prefer: respond-async
        assert await server.app[OPERATIONS].list() == []


async def test_cancel_then_404_and_finished_is_409(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    path = root / "in.ndjson"
    path.write_bytes(b'{"resourceType":"Patient","id":"a"}\n' * 3)
    async with serve(importer(settings, root), with_worker=False, patients=0) as (_, client):
        status_url = await start_import(client, parameters(path.as_uri()))
        async with client.delete(status_url) as response:
            assert response.status == 202
        async with client.get(status_url) as response:
            assert response.status == 404
    async with serve(importer(settings, root), with_worker=True, patients=0) as (_, client):
        status_url = await start_import(client, parameters(path.as_uri()))
        await finished(client, status_url)
        async with client.delete(status_url) as response:
            assert response.status == 409
            assert "finished" in await outcome(response)


async def test_http_inputs_from_an_allowed_host(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "served"
    root.mkdir()
    lines = [orjson.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(300)]
    (root / "patients.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    app = web.Application()
    app.router.add_static("/files", root)
    files = TestServer(app, host="127.0.0.1")
    await files.start_server()
    try:
        host = f"127.0.0.1:{files.port}"
        update = {"import_allowed_hosts": [host]}
        async with serve(importer(settings, root, **update), with_worker=True, patients=0) as (
            server,
            client,
        ):
            url = f"http://{host}/files/patients.ndjson"
            status_url = await start_import(client, parameters(url))
            _, manifest = await finished(client, status_url)
            assert manifest["output"] == [{"type": "Patient", "count": 300, "inputUrl": url}]
            report = await validate(server, status_url)
            assert report.ok, report.render()
    finally:
        await files.close()


async def test_retry_runs_only_the_failed_batches(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    path = root / "in.ndjson"
    path.write_bytes(
        b"".join(
            orjson.dumps({"resourceType": "Patient", "id": f"p{i}"}) + b"\n" for i in range(400)
        )
    )
    update = {"max_failures": 1, "import_batch_bytes": 3000}
    original = SourceReader.read_from
    broken = True

    async def flaky(self: SourceReader, url: str, offset: int) -> AsyncIterator[bytes]:
        if broken and offset > 5000:
            raise ConnectionResetError("the input went away")
        async for chunk in original(self, url, offset):
            yield chunk

    SourceReader.read_from = flaky  # type: ignore[method-assign]
    try:
        async with serve(importer(settings, root, **update), with_worker=True, patients=0) as (
            server,
            client,
        ):
            status_url = await start_import(client, parameters(path.as_uri()))
            job_id = status_url.rsplit("/", 1)[1]
            for _ in range(500):
                async with client.get(status_url) as response:
                    if response.status != 202:
                        assert response.status == 500
                        assert "in.ndjson" in await outcome(response)
                        break
                await asyncio.sleep(0.02)
            batches = await server.app[OPERATIONS].children(job_id)
            failed = {b.id for b in batches if b.status == JobStatus.FAILED}
            done = {b.id: b.lease.version for b in batches if b.status == JobStatus.COMPLETED}
            assert failed and done
            broken = False
            async with client.post(f"/_admin/jobs/{job_id}/retry") as response:
                assert response.status == 202
            await finished(client, status_url)
            after = await server.app[OPERATIONS].children(job_id)
            assert {b.id: b.lease.version for b in after if b.id in done} == done
            report = await validate(server, status_url)
            assert report.ok, report.render()
    finally:
        SourceReader.read_from = original  # type: ignore[method-assign]


async def test_a_killed_preparing_process_costs_a_retry_not_a_line(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process that prepares blocks is SIGKILLed between two blocks: the batch
    fails retriably, resumes from its checkpoint with a new one, and the store ends
    with every line exactly once."""
    root = tmp_path / "inputs"
    root.mkdir()
    path = root / "in.ndjson"
    lines = [orjson.dumps({"resourceType": "Patient", "id": f"p{i}"}) + b"\n" for i in range(60)]
    path.write_bytes(b"".join(lines))
    original, calls, killed = PREPARER.hand_over, 0, []

    def kill_during_the_third_block(handed: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:  # the child dies while it prepares (a sleep stands for the work)
            child = original([os.getpid])
            killed.append(child)
            threading.Timer(0.2, os.kill, (child, signal.SIGKILL)).start()
            original([partial(time.sleep, 10)])
        return original(handed)

    monkeypatch.setattr(PREPARER, "hand_over", kill_during_the_third_block)
    update = {"retry_base_seconds": 0.05, "retry_max_seconds": 0.1}
    async with serve(importer(settings, root, **update), with_worker=True, patients=0) as (
        server,
        client,
    ):
        status_url = await start_import(client, parameters(path.as_uri()))
        await finished(client, status_url)
        batches = await server.app[OPERATIONS].children(status_url.rsplit("/", 1)[1])
        assert len(killed) == 1, "the third block must have been prepared"
        hit = [b for b in batches if b.last_error and "preparing import lines" in b.last_error]
        assert len(hit) == 1, [b.last_error for b in batches]
        assert all(b.status == JobStatus.COMPLETED for b in batches)
        report = await validate(server, status_url)
        assert report.ok, report.render()
        assert await versions(server.app[RESOURCES]) == {("Patient", f"p{i}"): 1 for i in range(60)}
    assert original([os.getpid]) != killed[0], "a new child prepares after the kill"


def task_facilities(app: web.Application) -> dict[str, Any]:
    """What a worker gives an ImportBatchTask, from the app's stores: tests that run
    batches by hand, with no worker."""
    return {
        "operations": app[OPERATIONS],
        "resources": app[RESOURCES],
        "secrets": app[SECRETS],
        "destinations": app[DESTINATIONS],
        "settings": app[DESTINATIONS].settings,
    }


class _Crash(BaseException):
    """The worker process dies here."""


async def test_crash_between_error_commit_and_checkpoint(
    settings: Settings, tmp_path: Path
) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    lines = [line for line, _ in BROKEN] * 4
    path = root / "in.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    update = {
        "import_batch_bytes": 100_000,
        "import_lines_per_commit": 5,
        "import_max_line_bytes": 300,
    }
    async with serve(importer(settings, root, **update), with_worker=False, patients=0) as (
        server,
        client,
    ):
        status_url = await start_import(client, parameters(path.as_uri(), type_="Patient"))
        operations, store = server.app[OPERATIONS], server.app[RESOURCES]
        facilities = task_facilities(server.app)
        batch = await operations.acquire("w1", 30, utcnow())
        assert isinstance(batch, ImportBatchRecord)
        original = store.write_versions
        writes = 0

        async def write_then_crash(*args: Any, **kwargs: Any) -> Any:
            nonlocal writes
            writes += 1
            if writes == 3:  # this checkpoint's error lines are committed; its rows are not
                raise _Crash()
            return await original(*args, **kwargs)

        store.write_versions = write_then_crash  # type: ignore[method-assign]
        with pytest.raises(_Crash):
            await ImportBatchTask(batch, **facilities).run()
        store.write_versions = original  # type: ignore[method-assign]
        checkpointed = await operations.get(batch.id)
        assert isinstance(checkpointed, ImportBatchRecord) and checkpointed.lines_read == 10

        resumed = await operations.acquire("w2", 30, utcnow() + timedelta(seconds=31))
        assert isinstance(resumed, ImportBatchRecord) and resumed.restart_count == 1
        await ImportBatchTask(resumed, **facilities).run()
        _, manifest = await finished(client, status_url)
        assert sum(e["count"] for e in manifest["error"]) == 6 * 4
        report = await validate(server, status_url)
        assert report.ok, report.render()  # no error line twice, none missing
        counts = await versions(store)
        # dup changes on each of its 12 lines (male, female, other, ...): 12 versions, one
        # per line, none written twice by the resume; every other resource once.
        assert counts.pop(("Patient", "dup")) == 12
        assert set(counts.values()) == {1}


class _DiskFull(Exception):
    """A write fails inside its transaction."""


async def test_a_write_that_fails_costs_no_other_batch_a_line(
    settings: Settings, tmp_path: Path
) -> None:
    """Two batches write at once; one block's transaction fails. On SQLite the blocks of
    both shared it, so the other batch is told (``WritesLost``) instead of going on past
    lines it lost; on PostgreSQL it never notices. Both resume from what they committed:
    every line stored once, no line read twice."""
    root = tmp_path / "inputs"
    root.mkdir()
    names = ("a", "b")
    for name in names:
        lines = [orjson.dumps({"resourceType": "Patient", "id": f"{name}{i}"}) for i in range(40)]
        (root / f"{name}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    update = {"import_batch_bytes": 100_000, "import_lines_per_commit": 5}
    async with serve(importer(settings, root, **update), with_worker=False, patients=0) as (
        server,
        client,
    ):
        urls = [(root / f"{name}.ndjson").as_uri() for name in names]
        status_url = await start_import(client, parameters(*urls, type_="Patient"))
        operations, store = server.app[OPERATIONS], server.app[RESOURCES]
        facilities = task_facilities(server.app)
        batches = [await operations.acquire("w1", 30, utcnow()) for _ in names]
        assert all(isinstance(b, ImportBatchRecord) for b in batches)
        failing = batches[1]
        original = store.write_versions
        writes = 0

        async def third_write_fails(*args: Any, **kwargs: Any) -> Any:
            nonlocal writes
            if kwargs["group"].owner[0] == failing.id:
                writes += 1
                if writes == 3:  # inside its transaction, as a full disk would

                    def checkpoint(result: Any) -> Any:
                        raise _DiskFull()

                    kwargs["checkpoint"] = checkpoint
            return await original(*args, **kwargs)

        store.write_versions = third_write_fails  # type: ignore[method-assign]
        tasks = [ImportBatchTask(b, **facilities).run() for b in batches]  # type: ignore[arg-type]
        other, failed = await asyncio.gather(*tasks, return_exceptions=True)
        store.write_versions = original  # type: ignore[method-assign]
        assert isinstance(failed, _DiskFull), failed
        if settings.database_url is None:
            assert isinstance(other, WritesLost), other
        else:
            assert other is None, other

        later = utcnow() + timedelta(seconds=31)
        while (resumed := await operations.acquire("w2", 30, later)) is not None:
            assert isinstance(resumed, ImportBatchRecord)
            await ImportBatchTask(resumed, **facilities).run()
        _, manifest = await finished(client, status_url)
        assert sum(e["count"] for e in manifest["output"]) == 80
        report = await validate(server, status_url)
        assert report.ok, report.render()
        assert await versions(store) == {
            ("Patient", f"{n}{i}"): 1 for n in names for i in range(40)
        }
        parent = status_url.rsplit("/", 1)[1]
        done = [b for b in await operations.children(parent) if isinstance(b, ImportBatchRecord)]
        assert sum(b.created for b in done) == 80
        assert sum(b.unchanged + b.updated for b in done) == 0  # no committed line read twice


async def test_azure_blob_inputs_read_with_the_service_credential(
    settings: Settings, azurite: Any
) -> None:
    """Export to Azurite, then import those blobs by their plain URLs (no SAS): the
    service reads its own account with its own credential."""
    azure = {
        "destination": "azure-blob",
        "azure_connection_string": SecretStr(azurite.connection_string),
        "azure_container": f"c{uuid.uuid4().hex[:12]}",
    }
    async with serve(settings.model_copy(update=azure), with_worker=True, patients=4) as (
        _,
        session,
    ):
        async with session.get("/$export?_type=Patient,Condition", headers=ASYNC) as response:
            status_url = response.headers["Content-Location"]
        _, manifest = await finished(session, status_url)
    urls = [f["url"].split("?", 1)[0] for f in manifest["output"]]
    assert all(u.startswith(azurite.blob_endpoint) for u in urls)
    target = importer(settings, settings.data_dir, **azure)
    async with serve(target, with_worker=True, patients=0) as (server, client):
        import_url = await start_import(client, parameters(*urls))
        _, result = await finished(client, import_url)
        assert sum(o["count"] for o in result["output"]) == sum(
            f["count"] for f in manifest["output"]
        )
        report = await validate(server, import_url)
        assert report.ok, report.render()
        # A blob of another account (or any other host) is refused.
        other = urls[0].replace("devstoreaccount1", "someoneelse")
        async with client.post("/$import", data=parameters(other), headers=PREFER) as response:
            assert response.status == 400
