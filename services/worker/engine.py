"""The batch-at-a-time engine: a batch of requests in, one outcome per request out.

AEGIS's first engine, kept as the benchmark's peer and, behind
:class:`~services.worker.batch_core.BatchEngineCore`, as the fallback for architectures
the engine core (:mod:`services.worker.core`) does not run. :class:`HFGenerateEngine`
runs Hugging Face ``generate`` on static batches (left padding, attention masks).

Per request, in one batch: its own ``max_tokens``, temperature (0 = greedy), top-p,
seed and stop strings. A row stops at EOS or a stop string (``finish_reason='stop'``;
the stop string is removed) or at its token budget (``'length'``). Budgets are capped
so that prompt + new tokens fit ``BatchLimits.max_seq_len`` (and the model's context);
a prompt longer than that is cut from the left. Every cap leaves a ``note``.

Streaming: ``on_text`` gets the new text of streaming rows after every decode step.
Text that could still change is held back (a trailing partial UTF-8 character, or a
tail that may be the start of a stop string), so the deltas of a row concatenate to
exactly its final text.

Use (the worker loop)::

    loaded = load_model(name, device, precision)          # services.worker.model
    engine = HFGenerateEngine(loaded)
    outcomes = run_with_oom_guard(                        # services.worker.oom
        lambda part: engine.run(part, BatchLimits(max_seq_len), on_text=publish),
        requests, on_oom=record_oom, on_fail=engine.fail)
    batch = combine_outcomes(outcomes, engine.precision)  # one cycle's figures
    results = [r.to_result(request, loaded.name, worker_id) for ...]

OOM: when ``run`` raises (e.g. ``torch.OutOfMemoryError``), the rows' progress is kept
and a later ``run`` with the same request ids resumes from it (generated tokens become
part of the input), so text already streamed stays valid. :mod:`.oom` drives that.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from services.worker.model import LoadedModel
from services.worker.precision import PrecisionChange, apply_precision
from services.worker.rows import (
    OnText,
    RequestOutcome,
    Row,
    RowPlan,
    RowSampler,
    RowTracker,
    TextStreamer,
    plan_row,
    validate_prompt,
)
from shared.schemas import (
    GenerationRequest,
    Precision,
    now,
)

if TYPE_CHECKING:
    from services.worker.oom import OomInjector

log = logging.getLogger(__name__)

MAX_KEPT_ROWS = 4096


@dataclass(frozen=True)
class BatchLimits:
    """Limits in force for one batch (from the control settings).

    ``max_seq_len`` caps prompt + generated tokens per row. ``ignore_eos`` makes rows
    run to their token budget (benchmarks on random weights, where EOS is noise).
    """

    max_seq_len: int = 2048
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {self.max_seq_len}")


@dataclass
class BatchOutcome:
    """What one batch did: results in request order, plus the cycle's measurements.

    ``padding_ratio`` = pad tokens / all tokens of the padded input. Memory fields are
    CUDA figures for this batch (peak reset at its start); None on CPU.
    """

    results: list[RequestOutcome]
    precision: Precision
    tokens_generated: int = 0
    latency_s: float = 0.0
    padding_ratio: float = 0.0
    max_prompt_len: int = 0
    mean_prompt_len: float = 0.0
    max_new_tokens: int = 0
    memory_allocated_bytes: int | None = None
    memory_peak_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    # Raw counts behind padding_ratio, so outcomes of split batches combine exactly.
    pad_tokens: int = 0
    padded_tokens: int = 0

    @property
    def batch_size(self) -> int:
        return len(self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.latency_s if self.latency_s > 0 else 0.0


def failed_outcome(
    requests: Sequence[GenerationRequest], error: str, precision: Precision
) -> BatchOutcome:
    """An outcome answering every request with ``finish_reason='error'``."""
    stamp = now()
    results = [
        RequestOutcome(r.id, "", "error", r.prompt_len, 0, stamp, stamp, error=error)
        for r in requests
    ]
    return BatchOutcome(results=results, precision=precision)


def combine_outcomes(outcomes: Sequence[BatchOutcome], precision: Precision) -> BatchOutcome:
    """One outcome for a batch that ran as several (OOM splits); results keep order."""
    results = [r for o in outcomes for r in o.results]
    pad = sum(o.pad_tokens for o in outcomes)
    padded = sum(o.padded_tokens for o in outcomes)
    weights = [(o.mean_prompt_len, o.batch_size) for o in outcomes]
    return BatchOutcome(
        results=results,
        precision=outcomes[-1].precision if outcomes else precision,
        tokens_generated=sum(o.tokens_generated for o in outcomes),
        latency_s=sum(o.latency_s for o in outcomes),
        padding_ratio=pad / padded if padded else 0.0,
        max_prompt_len=max((o.max_prompt_len for o in outcomes), default=0),
        mean_prompt_len=sum(m * n for m, n in weights) / max(1, len(results)),
        max_new_tokens=max((o.max_new_tokens for o in outcomes), default=0),
        memory_allocated_bytes=_last([o.memory_allocated_bytes for o in outcomes]),
        memory_peak_bytes=_max([o.memory_peak_bytes for o in outcomes]),
        memory_reserved_bytes=_max([o.memory_reserved_bytes for o in outcomes]),
        pad_tokens=pad,
        padded_tokens=padded,
    )


def _last(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return present[-1] if present else None


def _max(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


class Engine(ABC):
    """Runs batches of requests on a loaded model. One batch at a time (not thread-safe).

    Contract of :meth:`run`: returns one :class:`RequestOutcome` per request, in the
    order given; a request that is bad on its own (empty prompt, token id out of the
    vocabulary) gets an ``error`` outcome without affecting the others. Errors of the
    whole batch (CUDA OOM above all) propagate; the engine stays usable, and running
    the same requests again (in any grouping) resumes rows that made progress.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @property
    def precision(self) -> Precision:
        return self.loaded.precision

    @abstractmethod
    def run(
        self,
        requests: list[GenerationRequest],
        limits: BatchLimits,
        on_text: OnText | None = None,
    ) -> BatchOutcome:
        """Generate for every request; ``on_text`` gets deltas of ``stream`` requests."""

    def fail(self, requests: list[GenerationRequest], error: str) -> BatchOutcome:
        """Error outcomes for requests that can't be served (e.g. OOM alone)."""
        self.forget([r.id for r in requests])
        return failed_outcome(requests, error, self.precision)

    @abstractmethod
    def forget(self, request_ids: Sequence[str]) -> None:
        """Drop any progress kept for these requests (they won't be run again)."""

    def set_precision(self, precision: Precision) -> PrecisionChange:
        """Switch precision between batches (raises ``PrecisionUnavailable``)."""
        return apply_precision(self.loaded, precision)


class HFGenerateEngine(Engine):
    """Static batches through ``model.generate`` with per-row sampling and stopping.

    ``fault`` is the optional :class:`~services.worker.oom.OomInjector` test hook;
    ``inject_oom_above_tokens > 0`` builds one that fails batches of more padded tokens.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        fault: OomInjector | None = None,
        inject_oom_above_tokens: int = 0,
    ) -> None:
        super().__init__(loaded)
        if fault is None and inject_oom_above_tokens > 0:
            from services.worker.oom import OomInjector

            fault = OomInjector(max_tokens=inject_oom_above_tokens)
        self.fault = fault
        self._partial: dict[str, Row] = {}

    def forget(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._partial.pop(request_id, None)

    def run(
        self,
        requests: list[GenerationRequest],
        limits: BatchLimits,
        on_text: OnText | None = None,
    ) -> BatchOutcome:
        started = time.perf_counter()
        rows = [self._row(r, limits) for r in requests]
        live = [row for row in rows if not row.finished]
        stats = _BatchStats()
        if live:
            try:
                stats = self._generate(live, limits, on_text)
            except BaseException:
                self._keep_progress(live)
                raise
        self.forget([r.id for r in requests])
        return BatchOutcome(
            results=[row.outcome() for row in rows],
            precision=self.precision,
            tokens_generated=sum(row.new_tokens for row in live),
            latency_s=time.perf_counter() - started,
            padding_ratio=stats.pad_tokens / stats.padded_tokens if stats.padded_tokens else 0.0,
            max_prompt_len=stats.max_prompt_len,
            mean_prompt_len=stats.mean_prompt_len,
            max_new_tokens=stats.max_new_tokens,
            memory_allocated_bytes=stats.memory.get("allocated"),
            memory_peak_bytes=stats.memory.get("peak"),
            memory_reserved_bytes=stats.memory.get("reserved"),
            pad_tokens=stats.pad_tokens,
            padded_tokens=stats.padded_tokens,
        )

    def _row(self, request: GenerationRequest, limits: BatchLimits) -> Row:
        kept = self._partial.pop(request.id, None)
        if kept is not None:
            kept.new_tokens = 0
            return kept
        row = Row(request, self.loaded.tokenizer.backend_tokenizer, now())
        problem = validate_prompt(request.prompt_token_ids, self.loaded.model.config.vocab_size)
        if problem:
            row.fail(problem, now())
            return row
        cap = min(limits.max_seq_len, self.loaded.context_length)
        bos = self.loaded.tokenizer.bos_token_id
        row.plan = plan_row(request.prompt_token_ids, request.params.max_tokens, cap, bos)
        return row

    def _keep_progress(self, rows: list[Row]) -> None:
        for row in rows:
            self._partial[row.request.id] = row
        # Requests that never come back (failed elsewhere) must not accumulate.
        while len(self._partial) > MAX_KEPT_ROWS:
            self._partial.pop(next(iter(self._partial)))
        log.info("kept progress of %d rows for a retry", len(rows))

    def _generate(
        self, rows: list[Row], limits: BatchLimits, on_text: OnText | None
    ) -> _BatchStats:
        device = self.loaded.device
        inputs = [row.input_ids() for row in rows]
        width = max(len(ids) for ids in inputs)
        max_new = max(row.remaining for row in rows)
        padded_tokens = len(rows) * (width + max_new)
        if self.fault is not None:
            self.fault.maybe_raise(len(rows), padded_tokens, step=0)
        input_ids, attention_mask = _left_pad(inputs, width, self.loaded.pad_token_id, device)
        eos = [] if limits.ignore_eos else self.loaded.eos_token_ids
        tracker = RowTracker(rows, eos, self._fault_hook(len(rows), padded_tokens))
        streamer = TextStreamer(rows, on_text) if on_text and any(r.streams for r in rows) else None
        _reset_peak(device)
        model: Any = self.loaded.model  # generate() is untyped in transformers
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._generation_config(max_new),
                logits_processor=LogitsProcessorList([RowSampler(rows, device)]),
                stopping_criteria=StoppingCriteriaList([tracker]),
                streamer=streamer,
            )
        tracker.finish_all(now())
        if streamer is not None:
            streamer.flush()
        return _BatchStats.measure(inputs, width, max_new, device)

    def _fault_hook(self, rows: int, padded_tokens: int) -> Callable[[int], None] | None:
        fault = self.fault
        if fault is None:
            return None
        return lambda step: fault.maybe_raise(rows, padded_tokens, step)

    def _generation_config(self, max_new: int) -> GenerationConfig:
        # Greedy decoding over scores the RowSampler has already reduced to one token
        # per row: HF's own samplers and warpers stay out of the way.
        return GenerationConfig(
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.loaded.pad_token_id,
            use_cache=True,
        )


def _left_pad(
    sequences: list[list[int]], width: int, pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [[pad_id] * (width - len(s)) + s for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(mask, dtype=torch.long, device=device),
    )


def _reset_peak(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))


@dataclass
class _BatchStats:
    max_prompt_len: int = 0
    mean_prompt_len: float = 0.0
    max_new_tokens: int = 0
    pad_tokens: int = 0
    padded_tokens: int = 0
    memory: dict[str, int] = field(default_factory=dict)

    @classmethod
    def measure(cls, inputs: list[list[int]], width: int, max_new: int, device: str) -> _BatchStats:
        real = sum(len(ids) for ids in inputs)
        memory: dict[str, int] = {}
        if device.startswith("cuda") and torch.cuda.is_available():
            dev = torch.device(device)
            memory = {
                "allocated": torch.cuda.memory_allocated(dev),
                "peak": torch.cuda.max_memory_allocated(dev),
                "reserved": torch.cuda.memory_reserved(dev),
            }
        return cls(
            width,
            real / len(inputs),
            max_new,
            width * len(inputs) - real,
            width * len(inputs),
            memory,
        )


# --- rows: one request's state while it is generated --------------------------------


__all__ = [
    "BatchLimits",
    "BatchOutcome",
    "Engine",
    "HFGenerateEngine",
    "OnText",
    "RequestOutcome",
    "RowPlan",
    "combine_outcomes",
    "failed_outcome",
    "plan_row",
]
