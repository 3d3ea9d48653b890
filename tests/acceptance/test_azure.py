"""exportsvc serve writing to Azure Blob Storage (Azurite), seen as a client sees it.

Files are downloaded through their SAS URLs with a plain HTTP client (no credentials),
``exportsvc validate`` must agree, no response or log line may carry the account key,
an outage makes the job retriable until storage is back, and a wrong key fails the job
with a readable reason.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.azurite import ACCOUNT_KEY, Azurite, connection_string

from .conftest import HttpResponse, LiveServer, ServerFactory, http

pytestmark = pytest.mark.acceptance
WRONG_KEY = base64.b64encode(b"not the account key of devstoreaccount1" * 2).decode()


def azure_settings(azurite: Azurite, key: str = ACCOUNT_KEY, **more: str) -> dict[str, str]:
    return {
        "destination": "azure-blob",
        "azure_connection_string": connection_string(azurite.port, key),
        "azure_container": f"c{uuid.uuid4().hex[:16]}",
        **more,
    }


def admin_job(server: LiveServer, status_url: str) -> dict[str, Any]:
    job_id = status_url.rsplit("/", 1)[1]
    response = server.request("GET", f"/_admin/jobs/{job_id}")
    assert response.status == 200, response.body
    job: dict[str, Any] = response.json()
    return job


def wait_job(
    server: LiveServer, status_url: str, condition: Any, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = admin_job(server, status_url)
        if condition(job):
            return job
        assert time.monotonic() < deadline, f"job never reached the condition: {job}"
        time.sleep(0.05)


def download(url: str) -> HttpResponse:
    response = http("GET", url)  # a plain client: no Authorization, no account key
    assert response.status == 200, (url.split("?")[0], response.status)
    return response


def test_export_to_azurite_with_sas_downloads(
    azurite: Azurite, start_exportsvc: ServerFactory
) -> None:
    server = start_exportsvc(**azure_settings(azurite))
    seen: list[bytes] = []
    for query in ("?_type=Patient,Observation", "?_type=Condition&_container=custom-exports"):
        status_url = server.kick_off("GET", f"/$export{query}")
        manifest_response = server.wait_for_manifest(status_url)
        seen += [manifest_response.body, str(manifest_response.headers).encode()]
        manifest = manifest_response.json()
        assert manifest["requiresAccessToken"] is False
        files = manifest["output"]
        assert files
        for f in files:
            url = urllib.parse.urlsplit(f["url"])
            assert f["url"].startswith(azurite.blob_endpoint + "/"), f["url"]
            assert "sig=" in url.query and "sp=r" in url.query
            body = download(f["url"])
            assert body.headers["Content-Type"] == "application/fhir+ndjson"
            lines = body.body.splitlines()
            assert len(lines) == f["count"]
            assert {json.loads(line)["resourceType"] for line in lines} == {f["type"]}
            seen.append(body.body)
        if "_container" in query:
            assert "/custom-exports/" in files[0]["url"]
        # The signature covers one blob: the same token on another blob is refused.
        first = urllib.parse.urlsplit(files[0]["url"])
        other = first._replace(path=first.path.rsplit("/", 1)[0] + "/other.ndjson").geturl()
        assert http("GET", other).status == 403
        job_id = status_url.rsplit("/", 1)[1]
        result = server.validate(job_id)
        assert result.returncode == 0, result.stdout + result.stderr
        seen += [result.stdout.encode(), result.stderr.encode()]
        seen.append(server.request("GET", f"/_admin/jobs/{job_id}").body)
    seen.append(server.request("GET", "/_admin/jobs").body)
    assert server.stop() == 0
    logs = server.stderr_path.read_bytes() + server.stdout_path.read_bytes()
    database = (server.data_dir / "exportsvc.sqlite3").read_bytes()
    for where, blob in [("responses", b"".join(seen)), ("logs", logs), ("database", database)]:
        assert ACCOUNT_KEY.encode() not in blob, f"the account key leaked into the {where}"
        assert b"AccountKey" not in blob, f"a connection string leaked into the {where}"


@pytest.fixture
def persistent_azurite() -> Iterator[Azurite]:
    with Azurite(persist=True) as server:
        yield server


def test_storage_outage_makes_the_job_retriable_then_it_completes(
    persistent_azurite: Azurite, start_exportsvc: ServerFactory
) -> None:
    azurite = persistent_azurite
    server = start_exportsvc(
        **azure_settings(
            azurite,
            page_size="20",
            commit_every_pages="1",
            retry_base_seconds="0.2",
            retry_max_seconds="0.5",
            max_failures="1000",
            azure_retry_total="0",
        )
    )
    status_url = server.kick_off("GET", "/$export?_type=Observation")
    wait_job(server, status_url, lambda j: j["resourcesDone"] > 0)
    azurite.stop()
    try:
        failing = wait_job(server, status_url, lambda j: j["failureCount"] >= 2)
        assert failing["status"] in ("retriable", "running")
        assert "destination" in (failing["lastError"] or "")
        assert server.request("GET", status_url).status == 202  # clients keep polling
    finally:
        azurite.start()
    manifest = server.wait_for_manifest(status_url, timeout=90).json()
    done = admin_job(server, status_url)
    assert done["status"] == "completed" and done["failureCount"] == 0
    for f in manifest["output"]:
        assert len(download(f["url"]).body.splitlines()) == f["count"]
    result = server.validate(status_url.rsplit("/", 1)[1])
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrong_account_key_fails_with_a_readable_reason(
    azurite: Azurite, start_exportsvc: ServerFactory
) -> None:
    server = start_exportsvc(**azure_settings(azurite, key=WRONG_KEY))
    status_url = server.kick_off("GET", "/$export?_type=Patient")
    wait_job(server, status_url, lambda j: j["status"] == "failed")
    response = server.request("GET", status_url)
    assert response.status >= 400
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    reason = body["issue"][0]["diagnostics"]
    assert "authorization failed for the destination" in reason
    assert "Traceback" not in reason
    assert server.stop() == 0
    logs = server.stderr_path.read_bytes()
    assert WRONG_KEY.encode() not in response.body + logs
