"""`exportsvc import` as a user runs it: files exported by one server are imported into
another (empty) one through the CLI, which follows the job with a progress bar; then
`exportsvc validate <import id>` agrees, and a second export holds the same resources."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import ServerFactory, exportsvc_command

pytestmark = pytest.mark.acceptance


def test_import_cli_round_trip(start_exportsvc: ServerFactory, tmp_path: Path) -> None:
    source = start_exportsvc()
    status_url = source.kick_off("GET", "/$export?_type=Patient,Condition,Observation")
    manifest = source.wait_for_manifest(status_url).json()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = []
    for n, entry in enumerate(manifest["output"]):
        path = inputs / f"{n:03d}-{entry['type']}.ndjson"
        path.write_bytes(source.request("GET", entry["url"]).body)
        files.append(path)
    broken = inputs / "zz-broken.ndjson"
    broken.write_bytes(b'{"resourceType":"Patient","id":"ok-1"}\n{not json\n')
    files.append(broken)

    empty = tmp_path / "empty"
    empty.mkdir()
    target = start_exportsvc(empty, import_root=str(inputs), import_batch_bytes="65536")
    result = subprocess.run(
        [*exportsvc_command(), "import", *map(str, files), "--server", target.base_url],
        env=target.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "import accepted: " in result.stderr and "[" in result.stderr  # the progress bar
    imported = json.loads(result.stdout)
    expected = sum(e["count"] for e in manifest["output"]) + 1
    assert sum(o["count"] for o in imported["output"]) == expected
    assert [e["count"] for e in imported["error"]] == [1]
    assert "refused 1 lines" in result.stderr

    import_id = result.stderr.split("import accepted: ", 1)[1].split()[0].rsplit("/", 1)[1]
    check = target.validate(import_id)
    assert check.returncode == 0, check.stdout[-3000:]
    again = target.kick_off("GET", "/$export?_type=Patient,Condition,Observation")
    again_manifest = target.wait_for_manifest(again).json()
    assert sum(e["count"] for e in again_manifest["output"]) == expected
    assert target.validate(again.rsplit("/", 1)[1]).returncode == 0
