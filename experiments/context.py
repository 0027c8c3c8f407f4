"""What every scenario shares: scale, device, seed, the loaded model, the output folder.

The model is loaded once per benchmark run and shared by AEGIS's engine and every peer
(same weights, same precision). Progress bars go to stderr through tqdm when it is
installed; without it the benchmark runs the same, silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from experiments import workloads
from services.worker.core.engine import CoreConfig, EngineCore
from services.worker.model import LoadedModel, load_model
from shared.schemas import GenerationRequest, Precision

log = logging.getLogger(__name__)

PEERS = ("eager", "compile", "cb")
GIB = 1024**3
# The engine core's KV pool in a benchmark: enough for every workload at any concurrency
# swept, leaving the rest of the card to the peers that run in the same process.
KV_BUDGET_BYTES = {"cuda": 24 * GIB, "cpu": GIB // 8}
MAX_BATCHED_TOKENS = {"cuda": 8192, "cpu": 512}
DECODE_STEPS = 8  # as the worker's default (AEGIS_DECODE_STEPS)


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None


@dataclass
class BenchContext:
    """Settings of one benchmark run plus the lazily loaded model."""

    scale: str
    device: str
    out: Path
    seed: int = 0
    peers: tuple[str, ...] = PEERS
    progress: bool = True
    compile_on_cpu: bool = False
    model_name: str = ""
    _loaded: LoadedModel | None = field(default=None, repr=False)
    _core: EngineCore | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        workloads.check_scale(self.scale)
        self.model_name = self.model_name or workloads.model_name(self.scale)
        self.out.mkdir(parents=True, exist_ok=True)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def precision(self) -> Precision:
        """bf16 on a GPU, fp32 on CPU: the same for AEGIS and every peer."""
        return "bf16" if self.cuda else "fp32"

    def model(self) -> LoadedModel:
        if self._loaded is None:
            torch.manual_seed(self.seed)
            self._loaded = load_model(self.model_name, self.device, self.precision, False)
        return self._loaded

    @property
    def kv_budget_bytes(self) -> int:
        return KV_BUDGET_BYTES["cuda" if self.cuda else "cpu"]

    @property
    def max_batched_tokens(self) -> int:
        return MAX_BATCHED_TOKENS["cuda" if self.cuda else "cpu"]

    def core(self) -> EngineCore:
        """AEGIS's engine core on the shared model, made once (pool and graphs kept).

        EOS is ignored, as by every peer: on random weights it is noise.
        """
        if self._core is None:
            config = CoreConfig(
                max_num_seqs=512,
                max_batched_tokens=self.max_batched_tokens,
                kv_budget_bytes=self.kv_budget_bytes,
                ignore_eos=True,
                decode_steps=DECODE_STEPS,
            )
            # Its decode graphs are captured by each run before its clock starts
            # (AegisRunner.run -> ServingLoop.prepare), for that run's settings.
            self._core = EngineCore(self.model(), config)
        return self._core

    def vocab_size(self) -> int:
        return int(self.model().model.config.vocab_size)

    def requests(self, name: str) -> list[tuple[workloads.Phase, list[GenerationRequest]]]:
        """Workload ``name`` at this scale and seed, per phase."""
        load = workloads.workload(name, self.scale)
        bos = self.model().tokenizer.bos_token_id
        return workloads.generate(load, self.seed, self.vocab_size(), bos if bos is not None else 1)

    def config(self, scenario: str) -> dict[str, Any]:
        return workloads.scenario_config(scenario, self.scale)

    def wants(self, peer: str) -> bool:
        return peer in self.peers

    @contextmanager
    def bar(self, total: int, desc: str) -> Iterator[Bar]:
        """A progress bar over ``total`` requests (a no-op without tqdm or when off)."""
        if not self.progress:
            yield _NoBar()
            return
        try:
            from tqdm import tqdm
        except ImportError:
            yield _NoBar()
            return
        with tqdm(total=total, desc=desc, unit="req", leave=False, dynamic_ncols=True) as bar:
            yield bar
