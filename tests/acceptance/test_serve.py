"""``exportsvc serve`` over real HTTP: kick-off, poll, download, validate, delete, stop.

Every export is checked three ways: the manifest and the files as a client sees them,
the files against the store read directly (byte for byte), and ``exportsvc validate``.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urlsplit

import pytest

from .conftest import ASYNC_HEADERS, Key, LiveServer, ServerFactory, Store, assert_operation_outcome

pytestmark = pytest.mark.acceptance

NDJSON = "application/fhir+ndjson"
Plan = tuple[str, str, bytes | None, dict[Key, bytes]]  # method, path, body, expected


def job_id(status_url: str) -> str:
    return urlsplit(status_url).path.rsplit("/", 1)[-1]


def parameters(params: list[dict[str, object]]) -> bytes:
    return json.dumps({"resourceType": "Parameters", "parameter": params}).encode()


def download(server: LiveServer, manifest: dict[str, object]) -> dict[Key, bytes]:
    """Fetch every output file, gzipped and plain; check framing, types and counts."""
    exported: dict[Key, bytes] = {}
    base = urlsplit(server.base_url)
    outputs = manifest["output"]
    assert isinstance(outputs, list)
    for entry in outputs:
        url, file_type, count = entry["url"], entry["type"], entry["count"]
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == (base.scheme, base.netloc), url
        zipped = server.request("GET", url, headers={"Accept-Encoding": "gzip"})
        assert zipped.status == 200, (url, zipped.status, zipped.body[:300])
        assert zipped.headers.get_content_type() == NDJSON
        assert zipped.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(zipped.body)
        plain = server.request("GET", url)
        assert plain.status == 200
        assert plain.headers.get_content_type() == NDJSON
        assert plain.headers["Content-Encoding"] is None
        assert plain.body == body, f"{url}: gzip and identity downloads differ"
        assert body.endswith(b"\n"), f"{url}: the last line has no newline"
        assert len(body) <= server.max_file_bytes, f"{url}: {len(body)} bytes"
        lines = body.split(b"\n")[:-1]
        assert len(lines) == count, f"{url}: manifest count {count}, {len(lines)} lines"
        for line in lines:
            resource = json.loads(line)
            assert resource["resourceType"] == file_type, url
            key = (file_type, resource["id"])
            assert key not in exported, f"{key} exported twice"
            exported[key] = line
    return exported


def assert_same_resources(exported: dict[Key, bytes], expected: dict[Key, bytes]) -> None:
    missing, extra = expected.keys() - exported.keys(), exported.keys() - expected.keys()
    assert not missing, f"{len(missing)} missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} extra, e.g. {sorted(extra)[:5]}"
    changed = sorted(k for k in expected if expected[k] != exported[k])
    assert not changed, f"{len(changed)} differ from the stored bytes, e.g. {changed[:5]}"


def export_and_check(
    server: LiveServer, method: str, path: str, body: bytes | None, expected: dict[Key, bytes]
) -> dict[str, object]:
    """The whole client round trip for one export; returns the manifest."""
    status_url = server.kick_off(method, path, body)
    done = server.wait_for_manifest(status_url)
    assert done.headers.get_content_type() in ("application/json", "application/fhir+json")
    expires = parsedate_to_datetime(done.headers["Expires"])
    assert expires > datetime.now(UTC), done.headers["Expires"]
    manifest: dict[str, object] = done.json()
    assert manifest["requiresAccessToken"] is False
    assert unquote(str(manifest["request"])) == unquote(server.url(path))
    transaction_time = datetime.fromisoformat(str(manifest["transactionTime"]))
    assert abs(datetime.now(UTC) - transaction_time) < timedelta(minutes=5)
    assert manifest["error"] == []
    assert_same_resources(download(server, manifest), expected)
    result = server.validate(job_id(status_url))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout, result.stdout
    return manifest


# -- what to export, and what the store says it must contain ------------------------------


def system_all(store: Store) -> Plan:
    return "GET", "/$export", None, store.current()


def system_some_types(store: Store) -> Plan:
    types = ["Patient", "Condition", "Observation"]
    return "GET", "/$export?_type=" + ",".join(types), None, store.current(types)


def patient_level(store: Store) -> Plan:
    return "GET", "/Patient/$export", None, store.compartment(store.patient_ids())


def group_level(store: Store) -> Plan:
    group_id, members = next(iter(store.groups().items()))
    assert members
    return "GET", f"/Group/{group_id}/$export", None, store.compartment(members)


def patient_level_post(store: Store) -> Plan:
    chosen = store.patient_ids()[:3]
    body = parameters(
        [{"name": "patient", "valueReference": {"reference": f"Patient/{p}"}} for p in chosen]
    )
    return "POST", "/Patient/$export", body, store.compartment(chosen)


def system_filtered(store: Store) -> Plan:
    """Laboratory Observations from 2024 on (a _typeFilter), every Condition."""

    def lab_since_2024(raw: bytes) -> bool:
        resource = json.loads(raw)
        codes = {c["code"] for cc in resource["category"] for c in cc["coding"]}
        return "laboratory" in codes and resource["effectiveDateTime"] >= "2024"

    expected = store.current(["Condition"])
    everything = store.current(["Observation"])
    expected |= {k: raw for k, raw in everything.items() if lab_since_2024(raw)}
    assert 0 < len(expected) - len(store.current(["Condition"])) < len(everything)
    query = "Observation%3Fcategory%3Dlaboratory%26date%3Dge2024"
    path = f"/$export?_type=Condition,Observation&_typeFilter={query}"
    return "GET", path, None, expected


@pytest.mark.parametrize(
    "plan",
    [
        system_all,
        system_some_types,
        patient_level,
        group_level,
        patient_level_post,
        system_filtered,
    ],
)
def test_export_round_trip(live_server: LiveServer, plan: Callable[[Store], Plan]) -> None:
    method, path, body, expected = plan(live_server.store)
    assert expected, "the plan selects nothing: the seed changed?"
    export_and_check(live_server, method, path, body, expected)


def test_large_types_roll_over_into_several_files(live_server: LiveServer) -> None:
    expected = live_server.store.current(["Observation"])
    manifest = export_and_check(live_server, "GET", "/$export?_type=Observation", None, expected)
    outputs = manifest["output"]
    assert isinstance(outputs, list)
    urls = [o["url"] for o in outputs]
    total_bytes = sum(len(raw) + 1 for raw in expected.values())
    assert len(urls) >= max(2, math.ceil(total_bytes / live_server.max_file_bytes)), urls
    assert len(set(urls)) == len(urls)
    assert {o["type"] for o in outputs} == {"Observation"}


# -- cancel -------------------------------------------------------------------------------


def wait_until_gone(server: LiveServer, job: str, timeout: float = 10.0) -> None:
    """The job's output folder (filesystem destination) is removed after a cancel."""
    folder = server.data_dir / "output" / job
    deadline = time.monotonic() + timeout
    while folder.exists():
        assert time.monotonic() < deadline, f"{folder} still exists {timeout}s after DELETE"
        time.sleep(0.05)


def test_delete_a_finished_export(live_server: LiveServer) -> None:
    status_url = live_server.kick_off("GET", "/$export?_type=Patient,Condition")
    manifest = live_server.wait_for_manifest(status_url).json()
    urls = [o["url"] for o in manifest["output"]]
    assert urls and all(live_server.request("GET", u).status == 200 for u in urls)
    assert (live_server.data_dir / "output" / job_id(status_url)).is_dir()

    deleted = live_server.request("DELETE", status_url)
    assert deleted.status == 202, deleted.body

    assert_operation_outcome(live_server.request("GET", status_url), 404)
    for url in urls:
        assert_operation_outcome(live_server.request("GET", url), 404)
    assert_operation_outcome(live_server.request("DELETE", status_url), 404)
    wait_until_gone(live_server, job_id(status_url))


def test_delete_right_after_kickoff(live_server: LiveServer) -> None:
    status_url = live_server.kick_off("GET", "/$export")
    deleted = live_server.request("DELETE", status_url)
    assert deleted.status == 202, deleted.body
    assert_operation_outcome(live_server.request("GET", status_url), 404)
    assert_operation_outcome(live_server.request("DELETE", status_url), 404)
    wait_until_gone(live_server, job_id(status_url))


# -- bad requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        pytest.param("GET", "/$export", {"Accept": "application/fhir+json"}, 400, id="no-prefer"),
        pytest.param("GET", "/$export?_type=NotAType", None, 400, id="unknown-type"),
        pytest.param("GET", "/Group/no-such-group/$export", None, 404, id="unknown-group"),
        pytest.param("GET", "/_operations/export/no-such-job", None, 404, id="unknown-job"),
        pytest.param("DELETE", "/_operations/export/no-such-job", None, 404, id="delete-unknown"),
    ],
)
def test_bad_requests_get_an_operation_outcome(
    live_server: LiveServer,
    method: str,
    path: str,
    headers: dict[str, str] | None,
    status: int,
) -> None:
    response = live_server.request(
        method, path, headers=ASYNC_HEADERS if headers is None else headers
    )
    assert_operation_outcome(response, status)
    assert response.headers["Content-Location"] is None


# -- signals ------------------------------------------------------------------------------


def test_sigterm_exits_zero_promptly(start_exportsvc: ServerFactory) -> None:
    server = start_exportsvc()
    server.wait_for_manifest(server.kick_off("GET", "/$export?_type=Patient"))
    started = time.monotonic()
    code = server.stop(timeout=15)
    elapsed = time.monotonic() - started
    assert code == 0, server.stderr()
    assert elapsed < 10, f"exportsvc took {elapsed:.1f}s to exit on SIGTERM"


def test_an_export_interrupted_by_sigterm_completes_after_a_restart(
    start_exportsvc: ServerFactory,
) -> None:
    # Small pages and frequent commits, so SIGTERM likely lands mid-export; whether it
    # does or not, the job must be complete and correct after the restart.
    settings = {"page_size": "25", "commit_every_pages": "2"}
    first = start_exportsvc(**settings)
    status_path = urlsplit(first.kick_off("GET", "/$export")).path
    assert first.stop() == 0, first.stderr()

    second = start_exportsvc(first.data_dir, **settings)
    second.wait_for_manifest(second.url(status_path))
    result = second.validate(job_id(status_path))
    assert result.returncode == 0, result.stdout + result.stderr
