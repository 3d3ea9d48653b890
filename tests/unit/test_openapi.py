"""The OpenAPI document: valid for every authorization mode, and it follows the mode."""

from __future__ import annotations

import pytest
import schemathesis

from exportsvc.api.openapi import openapi_document


@pytest.mark.parametrize("auth", ["off", "smart", "external"])
def test_the_document_loads_in_every_mode(auth: str) -> None:
    document = openapi_document("http://svc.example", auth)
    schema = schemathesis.openapi.from_dict(document)
    labels = [result.ok().label for result in schema.get_all_operations()]
    assert "GET /_operations/export/{job_id}" in labels
    assert ("POST /auth/token" in labels) is (auth == "smart")
    kickoff = document["paths"]["/$export"]["get"]
    assert ("security" in kickoff) is (auth != "off")
    assert "security" not in document["paths"]["/metadata"]["get"]
    assert document["servers"] == [{"url": "http://svc.example"}]
