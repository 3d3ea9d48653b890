"""``exportsvc import``: kick off ``$import`` through the API and follow it to the end.

Local paths become ``file://`` URLs (the service must have ``EXPORTSVC_IMPORT_ROOT``
covering them); URLs are passed as they are. Progress goes to stderr as a bar; the
final manifest to stdout. Exit 0 when the import completed (refused lines are listed in
its error files), 1 when it failed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson


def _url(value: str) -> str:
    return value if "://" in value else Path(value).resolve().as_uri()


def _bar(progress: str, width: int = 30) -> str:
    try:
        percent = int(progress.split("(", 1)[1].split("%", 1)[0])
    except (IndexError, ValueError):
        percent = 0
    filled = width * percent // 100
    return f"[{'#' * filled}{'.' * (width - filled)}] {progress}"


async def run_import(server: str, inputs: list[str], *, type_: str | None, mode: str) -> int:
    parts: list[dict[str, Any]] = []
    for value in inputs:
        part = [{"name": "url", "valueUri": _url(value)}]
        if type_:
            part.append({"name": "type", "valueCode": type_})
        parts.append({"name": "input", "part": part})
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
            {"name": "mode", "valueCode": mode},
            *parts,
        ],
    }
    headers = {"Prefer": "respond-async", "Content-Type": "application/fhir+json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.rstrip('/')}/$import", data=orjson.dumps(body), headers=headers
        ) as response:
            if response.status != 202:
                print(
                    f"import refused ({response.status}): {await response.text()}", file=sys.stderr
                )
                return 1
            status_url = response.headers["Content-Location"]
        print(f"import accepted: {status_url}", file=sys.stderr)
        while True:
            async with session.get(status_url) as response:
                if response.status == 202:
                    progress = response.headers.get("X-Progress", "")
                    print(f"\r{_bar(progress)}", end="", file=sys.stderr, flush=True)
                    await asyncio.sleep(min(int(response.headers.get("Retry-After", "1")), 5))
                    continue
                text = await response.text()
                print("", file=sys.stderr)
                if response.status != 200:
                    print(f"import failed ({response.status}): {text}", file=sys.stderr)
                    return 1
                manifest = orjson.loads(text)
                break
        print(orjson.dumps(manifest, option=orjson.OPT_INDENT_2).decode())
        imported = sum(o["count"] for o in manifest["output"])
        refused = sum(e["count"] for e in manifest["error"])
        print(f"imported {imported} resources, refused {refused} lines", file=sys.stderr)
        return 0
