"""The server against its own /openapi.json, with schemathesis: requests generated from the schema for every
operation, each response checked for a 5xx and for conformance (a documented status, content type and
body shape). Bounded in examples per operation, and in tokens: the server allows 2 output tokens and few
choices, so a generated request costs a decode step or two."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance,
)
from serving import KEY, NAMES, Served, build_engine  # tests/serving.py

from server.app import ServerSettings, create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 25  # per operation
SECONDS = 45  # for all of them


@pytest.fixture(scope="module")
def served(one_thread_module):
    srv = Served(create_app(build_engine(), ServerSettings(served_model_names=NAMES, api_key=KEY, max_waiting=4,
                                                           max_tokens_limit=2)))
    yield srv
    srv.stop()


def test_every_operation_conforms_and_never_fails(served):
    schema = schemathesis.openapi.from_url(f"{served.base}/openapi.json")
    start = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8  # completions, chat, models, tokenize, detokenize, reset, health, metrics
    for operation in operations:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy())
        def conforms(case) -> None:
            case.call_and_validate(base_url=served.base, headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS,
                                   timeout=30)

        conforms()
    assert time.monotonic() - start < SECONDS
