"""Request planning (validation to GenerationRequests) without a server."""

from __future__ import annotations

import pytest

from services.gateway.catalog import parse_model
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError
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


def test_sample_seeds_stay_distinct_signed_64_bit_integers() -> None:
    served = parse_model(dump(model_info()))
    body = CompletionRequest.model_validate({"prompt": "a", "seed": 2**63 - 2, "n": 4})
    seeds = [r.params.seed for r in plan_completion(body, served, GatewaySettings()).requests]
    assert seeds == [2**63 - 2, 2**63 - 1, -(2**63), -(2**63) + 1]


def test_model_names_are_checked_only_when_strict() -> None:
    served = parse_model(dump(model_info("org/Tiny-Model")))
    assert served.names() >= {"org/Tiny-Model", "Tiny-Model"}
    body = CompletionRequest.model_validate({"prompt": "a", "model": "gpt-4"})
    assert plan_completion(body, served, GatewaySettings()).requests  # lenient by default
    strict = GatewaySettings(strict_model_names=True, model_aliases="gpt-4,x")
    assert plan_completion(body, served, strict).requests  # an alias
    unknown = CompletionRequest.model_validate({"prompt": "a", "model": "llama"})
    with pytest.raises(ApiError) as refused:
        plan_completion(unknown, served, strict)
    assert (refused.value.status, refused.value.code) == (404, "model_not_found")
