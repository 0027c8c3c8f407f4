"""Seeded workloads from data: ``workloads.json`` spec + seed -> generation requests.

A workload (W1..W4) is a list of phases; a phase is ``count`` requests with prompt
lengths drawn uniformly from ``prompt`` and new tokens from ``new_tokens`` (a number or
an inclusive ``[min, max]`` range). Prompts are random token ids (after a BOS) of the
model's vocabulary, decoding is greedy (temperature 0) and every benchmark ignores EOS,
so each request generates exactly its ``max_tokens``.

The same (workload, scale, seed, vocabulary) always gives the same requests: each phase
draws from its own ``random.Random`` seeded with a string of those values.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.schemas import GenerationRequest, SamplingParams

SPEC_PATH = Path(__file__).with_name("workloads.json")
SCALES = ("tiny", "full")
FIRST_ID = 4  # ids below are special tokens (<unk>, <s>, </s>, <pad>)


class SpecError(ValueError):
    """The workload file is missing something or holds a bad value."""


@dataclass(frozen=True)
class Phase:
    """One homogeneous stretch of a workload."""

    name: str
    count: int
    prompt: tuple[int, int]
    new_tokens: tuple[int, int]

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Phase:
        phase = cls(
            str(raw["name"]), int(raw["count"]), _range(raw["prompt"]), _range(raw["new_tokens"])
        )
        if phase.count < 1 or phase.prompt[0] < 2 or phase.new_tokens[0] < 1:
            raise SpecError(f"phase {phase.name!r}: need count >= 1, prompt >= 2, new_tokens >= 1")
        return phase

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "prompt": list(self.prompt),
            "new_tokens": list(self.new_tokens),
        }


@dataclass(frozen=True)
class Workload:
    """A named workload at one scale."""

    name: str
    scale: str
    description: str
    phases: tuple[Phase, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scale": self.scale,
            "description": self.description,
            "phases": [p.to_dict() for p in self.phases],
        }


def _range(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        low, high = value
        if low > high:
            raise SpecError(f"range {value} has min > max")
        return low, high
    raise SpecError(f"expected an int or [min, max], got {value!r}")


@lru_cache(maxsize=4)
def _load_file(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def load_spec(path: Path = SPEC_PATH) -> dict[str, Any]:
    """The whole spec file (parsed once per path)."""
    return _load_file(path)


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise SpecError(f"unknown scale {scale!r}; use one of {SCALES}")


def workload(name: str, scale: str, path: Path = SPEC_PATH) -> Workload:
    """Workload ``name`` (e.g. ``W2``) at ``scale`` (``tiny`` or ``full``)."""
    check_scale(scale)
    spec = load_spec(path)["workloads"]
    if name not in spec:
        raise SpecError(f"unknown workload {name!r}; known: {sorted(spec)}")
    phases = tuple(Phase.parse(p) for p in spec[name][scale]["phases"])
    return Workload(name, scale, str(spec[name].get("description", "")), phases)


def scenario_config(name: str, scale: str, path: Path = SPEC_PATH) -> dict[str, Any]:
    """The settings of scenario ``name`` at ``scale``."""
    check_scale(scale)
    scenarios = load_spec(path)["scenarios"]
    if name not in scenarios:
        raise SpecError(f"unknown scenario {name!r}; known: {sorted(scenarios)}")
    return dict(scenarios[name][scale])


def model_name(scale: str, path: Path = SPEC_PATH) -> str:
    check_scale(scale)
    return str(load_spec(path)["models"][scale])


def policy_overrides(scale: str, path: Path = SPEC_PATH) -> dict[str, Any]:
    check_scale(scale)
    raw = load_spec(path).get("policy_overrides", {}).get(scale, {})
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def phase_requests(
    phase: Phase, workload_name: str, seed: int, vocab_size: int, bos_id: int = 1
) -> list[GenerationRequest]:
    """The requests of one phase: seeded random prompts, greedy, exact token budgets."""
    if vocab_size <= FIRST_ID:
        raise SpecError(f"vocabulary of {vocab_size} tokens is too small")
    rng = random.Random(f"{seed}:{workload_name}:{phase.name}")
    requests = []
    for i in range(phase.count):
        length = rng.randint(*phase.prompt)
        new = rng.randint(*phase.new_tokens)
        ids = [bos_id] + [rng.randrange(FIRST_ID, vocab_size) for _ in range(length - 1)]
        requests.append(
            GenerationRequest(
                id=f"{workload_name}-{phase.name}-{i:04d}",
                prompt="",
                prompt_token_ids=ids,
                params=SamplingParams(max_tokens=new, temperature=0.0),
                enqueued_at=0.0,
            )
        )
    return requests


def generate(
    load: Workload, seed: int, vocab_size: int, bos_id: int = 1
) -> list[tuple[Phase, list[GenerationRequest]]]:
    """Every phase of ``load`` with its requests, in order."""
    return [(p, phase_requests(p, load.name, seed, vocab_size, bos_id)) for p in load.phases]


def all_requests(
    load: Workload, seed: int, vocab_size: int, bos_id: int = 1
) -> list[GenerationRequest]:
    """The requests of every phase, concatenated."""
    return [r for _, requests in generate(load, seed, vocab_size, bos_id) for r in requests]


def useful_tokens(requests: list[GenerationRequest]) -> int:
    """Tokens the requests ask for: what every system must generate (EOS ignored)."""
    return sum(r.params.max_tokens for r in requests)
