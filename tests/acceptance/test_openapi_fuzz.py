"""schemathesis over ``GET /openapi.json`` of a live ``exportsvc serve``: every operation
gets its examples, the coverage phase's boundary and wrong-type cases, and fuzzed
schema-valid and schema-violating requests (deterministic, a bounded number each).
No answer may be a 5xx, every 4xx must be a FHIR OperationOutcome naming the problem
(the OAuth token endpoint's are OAuth errors), and the answers must match the document."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.drivers import CoverageGenerator
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.generation.overrides import Override
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.acceptance.conftest import LiveServer, http, start_server, stop_and_check

EXAMPLES = 25  # fuzzed cases per operation and mode, besides the coverage phase's


@pytest.fixture(scope="module")
def fuzzed_server(
    seeded_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("fuzzed") / "data"
    shutil.copytree(seeded_template, data_dir)
    server = start_server(data_dir, True, max_active_jobs_per_client="3")
    yield server
    # It served every request without a crash or an unhandled error, and stops cleanly.
    assert http("GET", server.url("/metadata")).status == 200
    unhandled = server.log.events("http.unhandled")
    stop_and_check(server)
    assert not unhandled, "\n".join(map(str, unhandled))


@pytest.fixture
def api_schema(fuzzed_server: LiveServer) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(fuzzed_server.url("/openapi.json"))
    # Drain stops the server (test_resilience drives it on its own).
    return schema.exclude(path="/_admin/drain")


def client_errors_are_outcomes(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """A 4xx is an OperationOutcome with an error issue (OAuth errors at /auth/token)."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    body: Any = json.loads(response.content)
    if case.path == "/auth/token":
        assert "error" in body, f"an OAuth error needs 'error': {body}"
        return True
    assert content_type.startswith("application/fhir+json"), content_type
    assert body.get("resourceType") == "OperationOutcome", body
    assert body["issue"] and body["issue"][0]["severity"] in ("error", "fatal"), body
    assert body["issue"][0].get("diagnostics"), f"the outcome names no problem: {body}"
    return True


SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same cases on every run
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def check(case: schemathesis.Case) -> None:
    response = case.call(timeout=30)
    case.validate_response(
        response,
        additional_checks=[client_errors_are_outcomes],
        # Whether a request is valid depends on more than its schema: an input URL on
        # the allowlist, _since before _until, the names in a Parameters body.
        excluded_checks=[positive_data_acceptance],
    )


def coverage_cases(schema: schemathesis.BaseSchema, operation: Any) -> list[schemathesis.Case]:
    """The coverage phase's cases: each keyword's boundaries and a wrong type for each
    property, valid and not (what ``st run`` sends first)."""
    generation = schema.config.generation_for(operation=operation, phase="coverage")
    generator = CoverageGenerator(
        operation=operation,
        generation_modes=list(GenerationMode),
        generation_config=generation,
        auth_storage=None,
        override=Override(),
        feedback=FeedbackSources(),
    )
    return list(generator)


def test_schemathesis(api_schema: schemathesis.BaseSchema) -> None:
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    for operation in operations:
        inputs = [operation.path_parameters, operation.query, operation.headers, operation.body]
        modes = [GenerationMode.POSITIVE]
        if any(len(part) for part in inputs):  # else there is nothing to violate
            modes.append(GenerationMode.NEGATIVE)
        for case in coverage_cases(api_schema, operation):
            try:
                check(case)
            except (FailureGroup, Exception) as exc:
                failures.append(f"{operation.label} (coverage): {exc}")
        for mode in modes:

            @SETTINGS
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: schemathesis.Case) -> None:
                check(case)

            try:
                fuzz()
            except (FailureGroup, Exception) as exc:  # one report per operation and mode
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)


def test_the_document_is_served_and_public(fuzzed_server: LiveServer) -> None:
    response = http("GET", fuzzed_server.url("/openapi.json"))
    assert response.status == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert document["servers"] == [{"url": fuzzed_server.base_url}]
    assert "/$export" in document["paths"] and "/$import" in document["paths"]
