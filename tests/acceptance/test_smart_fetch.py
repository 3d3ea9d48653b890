"""A real bulk data client, ``smart-fetch`` (PyPI), against ``exportsvc serve``.

smart-fetch reads /metadata, kicks off ``$export?_type=<its 15 types>`` with its default
``_typeFilter`` (Observations of the nine US Core categories), polls (waiting
Retry-After), downloads with gzip into ``OUT/<Type>.<nnn>.ndjson.gz``, writes
``OUT/.metadata`` and deletes the job. What it saved must equal the store, filtered the
same way.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from datastore.sqlite import SqliteResourceStore

from .conftest import Key, LiveServer, Store, start_server, stop_and_check

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


# smart-fetch 1.0.3's default filter for a server that is not Epic:
# Observation?category=social-history,vital-signs,imaging,laboratory,survey,exam,procedure,
# therapy,activity (sent with the inner commas as %2C).
DEFAULT_CATEGORIES = frozenset(
    [
        "social-history",
        "vital-signs",
        "imaging",
        "laboratory",
        "survey",
        "exam",
        "procedure",
        "therapy",
        "activity",
    ]
)


async def _add_observations_outside_the_default_categories(store_path: Path) -> None:
    """The seeded Observations are all vital signs or laboratory results: add some that
    smart-fetch's default filter must leave out, and one more it must keep."""
    group_members = Store(store_path).groups()
    members = next(iter(sorted(group_members.items())))[1][:3]
    categories: list[list[dict[str, object]]] = [
        [{"coding": [{"system": "http://example.org/obs-category", "code": "genomics"}]}],
        [],
        [{"coding": [{"system": "http://example.org/local", "code": "imaging"}]}],
    ]
    observations = [
        {
            "resourceType": "Observation",
            "id": f"extra-{n}-{i}",
            "meta": {"lastUpdated": "2025-12-01T00:00:00.000Z"},
            "status": "final",
            **({"category": category} if category else {}),
            "code": {"text": "extra"},
            "subject": {"reference": f"Patient/{patient}"},
        }
        for n, patient in enumerate(members)
        for i, category in enumerate(categories)
    ]
    store = SqliteResourceStore(store_path)
    await store.open()
    try:
        await store.write(observations, keep_last_updated=True)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def live_server(
    seeded_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The seeded data plus Observations of other categories, served."""
    data_dir = tmp_path_factory.mktemp("live") / "data"
    shutil.copytree(seeded_template, data_dir)
    store_path = data_dir / "exportsvc.sqlite3"
    asyncio.run(_add_observations_outside_the_default_categories(store_path))
    server = start_server(data_dir)
    yield server
    stop_and_check(server)


def default_filter(resources: dict[Key, bytes]) -> dict[Key, bytes]:
    """smart-fetch's default _typeFilter, read plainly: an Observation stays when one of
    its category codes (any system) is one of the nine."""

    def kept(key: Key, raw: bytes) -> bool:
        if key[0] != "Observation":
            return True
        categories = json.loads(raw).get("category", [])
        return any(c.get("code") in DEFAULT_CATEGORIES for cc in categories for c in cc["coding"])

    return {key: raw for key, raw in resources.items() if kept(key, raw)}


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
    everything = live_server.store.current(SMART_FETCH_TYPES)
    expected = default_filter(everything)
    assert len(expected) == len(everything) - 6, "the filter leaves the 6 extras out"
    assert_same_resources(read_output(out), expected)
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
    compartment = live_server.store.compartment(members, SMART_FETCH_TYPES)
    assert ("Observation", "extra-0-0") in compartment  # the group holds some extras
    assert_same_resources(saved, default_filter(compartment))
    assert_complete(live_server, out, SMART_FETCH_TYPES)
