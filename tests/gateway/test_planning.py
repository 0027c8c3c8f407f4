"""Request planning (validation to GenerationRequests) without a server."""

from __future__ import annotations

from services.gateway.catalog import parse_model
from services.gateway.config import GatewaySettings
from services.gateway.planning import plan_completion
from services.gateway.schemas import CompletionRequest
from shared.schemas import dump
from tests.gateway.echo_worker import model_info


def test_sampling_fields_reach_the_queued_requests() -> None:
    served = parse_model(dump(model_info()))
    body = CompletionRequest.model_validate({
        "prompt": ["a b", "c"], "max_tokens": 5, "temperature": 0, "top_p": 0.5,
        "stop": "x", "seed": 3, "ignore_eos": True,
    })  # fmt: skip
    plan = plan_completion(body, served, GatewaySettings())
    assert len(plan.requests) == 2
    params = plan.requests[0].params
    assert (params.max_tokens, params.temperature, params.top_p) == (5, 0.0, 0.5)
    assert params.stop == ["x"] and params.ignore_eos is True
    assert all(r.prompt_token_ids for r in plan.requests)
    assert not CompletionRequest.model_validate({"prompt": "p"}).ignore_eos  # off by default
