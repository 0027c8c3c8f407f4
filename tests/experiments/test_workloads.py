"""Workloads are data: seeded, reproducible, within their spec, rejected when malformed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import workloads
from experiments.benchmark import peers_of, scenarios_of
from experiments.measure import rate_between


def test_same_seed_same_requests_other_seed_other_prompts() -> None:
    load = workloads.workload("W2", "full")
    a = workloads.all_requests(load, seed=7, vocab_size=32000)
    b = workloads.all_requests(load, seed=7, vocab_size=32000)
    c = workloads.all_requests(load, seed=8, vocab_size=32000)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]
    assert len({r.id for r in a}) == len(a) == sum(p.count for p in load.phases)


def test_requests_follow_their_phase_spec() -> None:
    for name in ("W1", "W2", "W3", "W4"):
        for phase, requests in workloads.generate(workloads.workload(name, "full"), 0, 32000):
            assert len(requests) == phase.count
            for r in requests:
                assert phase.prompt[0] <= r.prompt_len <= phase.prompt[1]
                assert phase.new_tokens[0] <= r.params.max_tokens <= phase.new_tokens[1]
                assert r.prompt_token_ids[0] == 1
                assert all(workloads.FIRST_ID <= t < 32000 for t in r.prompt_token_ids[1:])
                assert r.params.temperature == 0.0


def test_full_scale_w1_is_benchmarks_w1() -> None:
    (phase,) = workloads.workload("W1", "full").phases
    assert (phase.count, phase.prompt, phase.new_tokens) == (512, (64, 512), (128, 128))
    lengths = [p.prompt for p in workloads.workload("W2", "full").phases]
    assert lengths == [(32, 128), (1024, 1900), (32, 1900)]


def test_malformed_specs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(workloads.SpecError):
        workloads.Phase.parse({"name": "x", "count": 4, "prompt": [9, 3], "new_tokens": 2})
    with pytest.raises(workloads.SpecError):
        workloads.Phase.parse({"name": "x", "count": 0, "prompt": 8, "new_tokens": 2})
    with pytest.raises(workloads.SpecError):
        workloads.workload("W9", "tiny")
    with pytest.raises(workloads.SpecError):
        workloads.workload("W1", "huge")
    spec = tmp_path / "w.json"
    spec.write_text(
        json.dumps(
            {
                "workloads": {
                    "W": {
                        "tiny": {
                            "phases": [{"name": "p", "count": 2, "prompt": "long", "new_tokens": 1}]
                        }
                    }
                }
            }
        )
    )
    with pytest.raises(workloads.SpecError):
        workloads.workload("W", "tiny", path=spec)


def test_cli_lists_and_rates() -> None:
    assert scenarios_of("all") == [
        "sweep", "bursty", "goodput", "system", "scaleout", "colocated", "memory", "adaptive",
        "elastic", "oom",
    ]  # fmt: skip
    assert scenarios_of("colocated,scaleout") == ["scaleout", "colocated"]
    assert scenarios_of("oom, sweep") == ["sweep", "oom"]
    with pytest.raises(ValueError):
        scenarios_of("sweep,bogus")
    assert peers_of("none") == ()
    assert peers_of("cb,eager") == ("cb", "eager")
    timeline = [[0.0, 1.0, 100], [1.0, 2.0, 100], [2.0, 4.0, 50]]
    assert rate_between(timeline, 0.0, 2.0) == 100.0
    assert rate_between(timeline, 2.0, 4.0) == 25.0
    assert rate_between(timeline, 3.0, 3.0) == 0.0
    # A batch straddling the boundary counts on both sides in proportion to its time.
    assert rate_between(timeline, 0.5, 1.5) == 100.0
    assert rate_between(timeline, 3.0, 4.0) == 25.0
