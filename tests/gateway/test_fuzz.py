"""Schema fuzzing (schemathesis) of the running gateway from its own OpenAPI document.

Every operation gets generated bodies, parameters and headers: the gateway must never
answer 5xx, and each answer must be one the document declares (status, content type,
body schema). Bounded: 25 cases per operation, a few hundred in all.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from services.gateway.app import create_app
from tests.gateway.conftest import RunningGateway

EXAMPLES_PER_OPERATION = 25
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]
OPERATIONS = [
    (path, method.upper())
    for path, item in create_app().openapi()["paths"].items()
    for method in item
]


@pytest.fixture(scope="module")
def gateway_schema(module_gateway: RunningGateway) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{module_gateway.url}/openapi.json")


@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_no_server_error_and_answers_match_the_document(
    gateway_schema: schemathesis.BaseSchema, path: str, method: str
) -> None:
    operation = gateway_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=15)

    fuzz()
