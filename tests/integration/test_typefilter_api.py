"""``_typeFilter`` and ``_elements`` over HTTP: GET and POST kick-offs, lenient handling,
the CapabilityStatement, and the files a client downloads."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from exportsvc.seed import generate
from exportsvc.settings import Settings
from tests.integration.test_api import ASYNC, finished, outcome, serve

CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
SEEDED = list(generate(5, seed=3))  # what serve() writes into the store


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[tuple[TestServer, ClientSession]]:
    async with serve(settings, with_worker=True) as running:
        yield running


def seeded(type_: str) -> list[dict[str, Any]]:
    return [r for r in SEEDED if r["resourceType"] == type_]


def category(resource: dict[str, Any]) -> set[str]:
    return {c["code"] for cc in resource.get("category", []) for c in cc["coding"]}


async def download(session: ClientSession, manifest: Any) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for f in manifest["output"]:
        async with session.get(f["url"], headers={"Accept-Encoding": "gzip"}) as response:
            assert response.status == 200
            lines = gzip.decompress(await response.content.read()).splitlines()
        out.setdefault(f["type"], []).extend(orjson.loads(line) for line in lines)
    return out


async def test_get_with_repeated_comma_joined_and_double_encoded_filters(
    server: tuple[TestServer, ClientSession],
) -> None:
    _, session = server
    # smart-fetch's form (inner commas as %2C, then URL-encoded once more), the spec's
    # form (encoded queries joined by a raw comma) and a repeated parameter, together.
    smart_fetch = quote("Observation?category=laboratory%2Csocial-history", safe="")
    spec = quote("Patient?gender=female", safe="") + "," + quote("Patient?gender=other", safe="")
    url = (
        f"/$export?_type=Observation,Patient,Condition&_typeFilter={smart_fetch}"
        f"&_typeFilter={spec}&_typeFilter={quote('Condition?_lastUpdated=ge2024', safe='')}"
    )
    async with session.get(url, headers=ASYNC) as response:
        assert response.status == 202, await response.text()
        status_url = response.headers["Content-Location"]
    _, manifest = await finished(session, status_url)
    assert manifest["error"] == []
    got = await download(session, manifest)
    want = {
        "Observation": {r["id"] for r in seeded("Observation") if "laboratory" in category(r)},
        "Patient": {r["id"] for r in seeded("Patient") if r["gender"] == "female"},
        "Condition": {r["id"] for r in seeded("Condition") if r["meta"]["lastUpdated"] >= "2024"},
    }
    assert all(want.values()) and want["Observation"] != {r["id"] for r in seeded("Observation")}
    assert {t: {r["id"] for r in rs} for t, rs in got.items()} == want


async def test_post_parameters_with_filters_and_elements(
    server: tuple[TestServer, ClientSession],
) -> None:
    _, session = server
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Observation,Patient"},
            {"name": "_typeFilter", "valueString": "Observation?category=vital-signs"},
            {"name": "_typeFilter", "valueString": "Observation?code=http://loinc.org|2339-0"},
            {"name": "_elements", "valueString": "Observation.code,Observation.status"},
        ],
    }
    async with session.post("/$export", headers=ASYNC, data=orjson.dumps(body)) as response:
        assert response.status == 202, await response.text()
        status_url = response.headers["Content-Location"]
    _, manifest = await finished(session, status_url)
    got = await download(session, manifest)
    stored = {r["id"]: r for r in SEEDED}
    vital_or_glucose = {
        r["id"]
        for r in seeded("Observation")
        if "vital-signs" in category(r) or r["code"]["coding"][0]["code"] == "2339-0"
    }
    assert {r["id"] for r in got["Observation"]} == vital_or_glucose
    for resource in got["Observation"]:
        assert set(resource) == {"resourceType", "id", "meta", "code", "status"}
        assert resource["code"] == stored[resource["id"]]["code"]
        assert resource["meta"]["tag"][-1]["code"] == "SUBSETTED"
    # _elements names only Observation: Patients are whole, byte for byte what was stored
    assert {r["id"] for r in got["Patient"]} == {r["id"] for r in seeded("Patient")}
    assert all("SUBSETTED" not in orjson.dumps(r).decode() for r in got["Patient"])


async def test_lenient_handling_ignores_unsupported_filters_and_reports_them(
    server: tuple[TestServer, ClientSession],
) -> None:
    _, session = server
    url = "/$export?_type=Immunization&_typeFilter=" + quote(
        "Immunization?vaccine-code=140&_text=flu", safe=""
    )
    async with session.get(url, headers=ASYNC) as response:
        assert response.status == 400
        assert "_text" in await outcome(response)
    lenient = {**ASYNC, "Prefer": "respond-async, handling=lenient"}
    async with session.get(url, headers=lenient) as response:
        assert response.status == 202
        status_url = response.headers["Content-Location"]
    _, manifest = await finished(session, status_url)
    got = await download(session, manifest)
    assert len(got["Immunization"]) == len(seeded("Immunization"))  # not filtered at all
    (error,) = manifest["error"]
    async with session.get(error["url"], headers={"Accept-Encoding": "identity"}) as response:
        (line,) = (await response.read()).splitlines()
    diagnostics = orjson.loads(line)["issue"][0]["diagnostics"]
    assert "_text" in diagnostics and "ignored" in diagnostics


async def test_metadata_lists_the_search_parameters_of_each_type(
    server: tuple[TestServer, ClientSession],
) -> None:
    _, session = server
    async with session.get("/metadata") as response:
        statement = await response.json(content_type=None)
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    observation = {p["name"]: p for p in resources["Observation"]["searchParam"]}
    assert {"code", "category", "status", "date", "subject", "patient", "_lastUpdated"} <= set(
        observation
    )
    assert observation["date"]["type"] == "date"
    assert observation["code"]["definition"] == "http://hl7.org/fhir/SearchParameter/clinical-code"
    patient = {p["name"] for p in resources["Patient"]["searchParam"]}
    assert {"name", "family", "identifier", "_id", "_tag", "_profile"} <= patient
    condition = {p["name"] for p in resources["Condition"]["searchParam"]}
    assert "onset-date" in condition
    medication = {p["name"] for p in resources["MedicationRequest"]["searchParam"]}
    assert "authoredon" in medication
    assert "_typeFilter" in statement["rest"][0]["operation"][0]["documentation"]
