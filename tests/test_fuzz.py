"""A bounded schemathesis run over every route of the OpenAPI document: no 5xx that is not
about a dependency, and every documented answer shaped as documented.

It runs with a tenant's ``jobs:write`` and ``jobs:read`` key: admin routes are fuzzed up
to their scope check (403), so random promotions never move the suite's production models.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import Stack, make_client


@pytest.fixture(scope="module")
def fuzz_key(stack: Stack) -> Iterator[str]:
    with make_client(stack) as client:
        yield client.headers["authorization"]


@pytest.fixture(scope="module")
def api_schema(stack: Stack):  # type: ignore[no-untyped-def]
    return schemathesis.openapi.from_url(stack.api_url + "/openapi.json")


def test_every_route_answers_as_documented(api_schema, fuzz_key: str) -> None:  # type: ignore[no-untyped-def]
    """Driven through Hypothesis directly, one operation after another (schemathesis's
    pytest plugin does not run under this pytest)."""
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=30,
            deadline=None,
            derandomize=True,  # the same cases every run: a red run reruns as it was
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case):  # type: ignore[no-untyped-def]
            case.call_and_validate(
                headers={"Authorization": fuzz_key},
                checks=[not_a_server_error, response_schema_conformance],
                timeout=30,
            )

        try:
            run()
        except Exception as exc:
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert len(operations) >= 10
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_the_fuzzed_schema_covers_every_route(api_schema, stack: Stack) -> None:  # type: ignore[no-untyped-def]
    paths = set(httpx.get(stack.api_url + "/openapi.json").json()["paths"])
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/models/{name}/versions"} <= paths
    labels = {result.ok().path for result in api_schema.get_all_operations()}
    assert labels == paths
