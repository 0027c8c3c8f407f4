"""The load test's client and its summary (the full run is ``python -m experiments.loadtest``)."""

from __future__ import annotations

import asyncio

from experiments.loadtest import Outcome, Phase, prompt_text, run_phase, summarize
from tests.gateway.conftest import RunningGateway


def test_the_raw_client_gets_every_answer(module_gateway: RunningGateway) -> None:
    phase = Phase("tiny", 40, 8, worker_batch=1, worker_step_ms=1)
    result = asyncio.run(run_phase(module_gateway.settings.gateway_port, phase))
    assert result.statuses == {"200": 40}
    assert result.errors_other_than_429 == 0
    assert result.latency_ok_p50_s is not None and result.latency_ok_p50_s > 0


def test_the_summary_counts_only_non_429s_as_errors() -> None:
    outcomes = [Outcome(200, 0.1, None), Outcome(429, 0.01, "1"), Outcome(0, 0.5, None),
                Outcome(429, 0.02, None)]  # fmt: skip
    result = summarize(Phase("p", 4, 2, 1, 1), outcomes, wall_s=2.0)
    assert result.statuses == {"0": 1, "200": 1, "429": 2}
    assert result.errors_other_than_429 == 1
    assert result.all_429_have_retry_after is False
    assert result.ok_per_s == 0.5


def test_prompts_of_a_given_size_are_that_size() -> None:
    assert prompt_text(3, 0) == "load test request 3"
    assert len(prompt_text(3, 1200)) == 1200 and prompt_text(3, 1200).startswith("load test")
