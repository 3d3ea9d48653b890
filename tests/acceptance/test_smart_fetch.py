"""A real bulk data client, ``smart-fetch`` (PyPI), against ``exportsvc serve``.

smart-fetch reads /metadata, kicks off ``$export?_type=<its 15 types>``, polls (waiting
Retry-After), downloads with gzip into ``OUT/<Type>.<nnn>.ndjson.gz``, writes
``OUT/.metadata`` and deletes the job. What it saved must equal the store.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Key, LiveServer

pytestmark = pytest.mark.acceptance

SMART_FETCH = Path(sys.executable).with_name("smart-fetch")
# The types smart-fetch 1.0.3 asks for when given no --type.
SMART_FETCH_TYPES = frozenset(
    {
        "AllergyIntolerance",
        "Condition",
        "Device",
        "DiagnosticReport",
        "DocumentReference",
        "Encounter",
        "EpisodeOfCare",
        "Immunization",
        "MedicationDispense",
        "MedicationRequest",
        "Observation",
        "Patient",
        "Procedure",
        "ServiceRequest",
        "Specimen",
    }
)


@pytest.fixture(autouse=True)
def _smart_fetch_installed() -> None:
    if not SMART_FETCH.exists():
        pytest.fail(f"{SMART_FETCH} is missing: pip install smart-fetch==1.0.3 (dev group)")


def smart_fetch(server: LiveServer, out: Path, *args: str) -> None:
    result = subprocess.run(
        [
            str(SMART_FETCH),
            "bulk",
            "--fhir-url",
            server.base_url,
            "--no-default-filters",
            *args,
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"smart-fetch exited {result.returncode}:\n{output}"


def read_output(out: Path) -> dict[Key, bytes]:
    """Every resource smart-fetch saved (``*.ndjson.gz``; log.ndjson is its own log)."""
    saved: dict[Key, bytes] = {}
    files = sorted(out.glob("*.ndjson.gz"))
    assert files, f"smart-fetch saved nothing in {out}"
    for path in files:
        file_type = path.name.split(".", 1)[0]
        for line in gzip.decompress(path.read_bytes()).splitlines():
            resource = json.loads(line)
            assert resource["resourceType"] == file_type, path.name
            key = (file_type, resource["id"])
            assert key not in saved, f"{key} saved twice"
            saved[key] = line
    return saved


def assert_same_resources(saved: dict[Key, bytes], expected: dict[Key, bytes]) -> None:
    missing, extra = expected.keys() - saved.keys(), saved.keys() - expected.keys()
    assert not missing, f"{len(missing)} missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} extra, e.g. {sorted(extra)[:5]}"
    changed = sorted(k for k in expected if expected[k] != saved[k])
    assert not changed, f"{len(changed)} differ from the stored bytes, e.g. {changed[:5]}"


def assert_complete(server: LiveServer, out: Path, types: frozenset[str]) -> None:
    """``.metadata`` says the export finished; smart-fetch deleted the job afterwards."""
    metadata = json.loads((out / ".metadata").read_text())
    assert metadata["complete"] is True, metadata
    assert set(metadata["done"]) == types, metadata
    events = [json.loads(line) for line in (out / "log.ndjson").read_text().splitlines()]
    status_urls = {e["exportId"] for e in events if e["eventId"] == "kickoff"}
    assert len(status_urls) == 1, status_urls
    assert server.request("GET", status_urls.pop()).status == 404


def test_system_export(live_server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    smart_fetch(live_server, out)
    assert_same_resources(read_output(out), live_server.store.current(SMART_FETCH_TYPES))
    assert_complete(live_server, out, SMART_FETCH_TYPES)


def test_group_export(live_server: LiveServer, tmp_path: Path) -> None:
    # smart-fetch's default types include Device, which is outside the Patient
    # compartment: the server must accept the list and export the compartment types.
    group_id, members = next(iter(live_server.store.groups().items()))
    out = tmp_path / "out"
    smart_fetch(live_server, out, "--group", group_id)
    saved = read_output(out)
    patients = {id_ for (type_, id_) in saved if type_ == "Patient"}
    assert patients == set(members), "the Patients saved are not the group's members"
    assert_same_resources(saved, live_server.store.compartment(members, SMART_FETCH_TYPES))
    assert_complete(live_server, out, SMART_FETCH_TYPES)
