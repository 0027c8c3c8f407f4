"""The inference engine: a batch of requests in, one outcome per request out.

:class:`Engine` is the contract the worker loop depends on; :class:`HFGenerateEngine`
implements it with Hugging Face ``generate`` on static batches (left padding,
attention masks). A faster engine (continuous batching, CUDA graphs) replaces it by
implementing ``run`` and ``forget`` (``fail`` and ``set_precision`` have defaults).

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
from tokenizers import Tokenizer
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from services.worker.model import LoadedModel
from services.worker.precision import PrecisionChange, apply_precision
from shared.schemas import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Precision,
    TokenDelta,
    now,
)

if TYPE_CHECKING:
    from services.worker.oom import OomInjector

log = logging.getLogger(__name__)

OnText = Callable[[list[TokenDelta]], None]
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
class RequestOutcome:
    """The answer to one request (``finish_reason='error'`` with ``error`` set on failure)."""

    request_id: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    started_at: float
    finished_at: float
    first_token_at: float | None = None
    note: str | None = None
    error: str | None = None

    def to_result(self, request: GenerationRequest, model: str, worker_id: str) -> GenerationResult:
        """The wire message for this outcome."""
        return GenerationResult(
            request_id=self.request_id,
            text=self.text,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            model=model,
            worker_id=worker_id,
            queued_at=request.enqueued_at,
            started_at=self.started_at,
            first_token_at=self.first_token_at,
            finished_at=self.finished_at,
            note=self.note,
            error=self.error,
        )


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


@dataclass(frozen=True)
class RowPlan:
    """A request fitted to the sequence cap: the prompt fed and the new-token budget."""

    prompt_ids: list[int]
    max_new_tokens: int
    note: str | None = None


def plan_row(prompt_ids: list[int], max_tokens: int, cap: int, bos_id: int | None) -> RowPlan:
    """Fit prompt + new tokens into ``cap`` tokens, saying what was cut.

    A prompt of ``cap`` tokens or more keeps its last tokens (and its leading BOS),
    leaving room for ``min(max_tokens, cap // 4)`` new ones; a budget that would pass
    the cap is reduced to fit.
    """
    notes = []
    ids = list(prompt_ids)
    if len(ids) >= cap:
        keep = cap - min(max_tokens, max(1, cap // 4))
        lead = [ids[0]] if bos_id is not None and ids[0] == bos_id else []
        ids = lead + ids[len(ids) - (keep - len(lead)) :]
        notes.append(
            f"prompt truncated from the left: {len(prompt_ids)} -> {len(ids)} tokens "
            f"(max_seq_len {cap})"
        )
    budget = min(max_tokens, cap - len(ids))
    if budget < max_tokens:
        notes.append(f"max_tokens capped {max_tokens} -> {budget} by max_seq_len {cap}")
    return RowPlan(ids, budget, "; ".join(notes) or None)


def validate_prompt(ids: list[int], vocab_size: int) -> str | None:
    """Why these prompt ids can't be run, or None when they can."""
    if not ids:
        return "empty prompt: no prompt tokens"
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        return f"prompt token id {bad} is outside the vocabulary (0..{vocab_size - 1})"
    return None


@dataclass(eq=False)
class Row:
    """One request in flight: generated ids, decoded text, streaming and finish state."""

    request: GenerationRequest
    decoder: Tokenizer
    started_at: float
    plan: RowPlan = field(default_factory=lambda: RowPlan([], 0))
    tokens: list[int] = field(default_factory=list)  # generated ids of the text (no EOS)
    completion_tokens: int = 0
    new_tokens: int = 0  # generated in the current run (a resumed row had some before)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already streamed
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    finished_at: float | None = None
    error: str | None = None
    generator: torch.Generator | None = None  # the seeded sampler's state, kept on resume

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def streams(self) -> bool:
        return self.request.stream

    @property
    def remaining(self) -> int:
        return self.plan.max_new_tokens - self.completion_tokens

    def input_ids(self) -> list[int]:
        return self.plan.prompt_ids + self.tokens

    def add(self, token: int, eos_ids: frozenset[int], stamp: float) -> None:
        """Take the row's next token and decide whether the row is done."""
        self.completion_tokens += 1
        self.new_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = stamp
        if token in eos_ids and not self.request.params.ignore_eos:
            self._finish("stop", stamp)
            return
        self.tokens.append(token)
        if self.streams or self.request.params.stop:
            self.text = self._decode()
            if self._cut_at_stop():
                self._finish("stop", stamp, decode=False)
                return
        if self.remaining <= 0:
            self._finish("length", stamp)

    def fail(self, error: str, stamp: float) -> None:
        self.error = error
        self._finish("error", stamp, decode=False)

    def finish_now(self, stamp: float) -> None:
        """Close a row ``generate`` left unfinished (its budget ran out with the batch)."""
        if not self.finished:
            self._finish("length", stamp)

    def _decode(self) -> str:
        return self.decoder.decode(self.tokens, skip_special_tokens=True)

    def _cut_at_stop(self) -> bool:
        hits = [i for i in (self.text.find(s) for s in self.request.params.stop if s) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _finish(self, reason: FinishReason, stamp: float, decode: bool = True) -> None:
        if decode:
            self.text = self._decode()
        self.finish_reason = reason
        self.finished_at = stamp

    def take_delta(self) -> TokenDelta | None:
        """The text that became final since the last call (None when nothing did)."""
        end = len(self.text) if self.finished else self._stable_end()
        if end <= self.emitted:
            return None
        delta = TokenDelta(
            request_id=self.request.id, offset=self.emitted, text=self.text[self.emitted : end]
        )
        self.emitted = end
        return delta

    def _stable_end(self) -> int:
        # A trailing U+FFFD is a UTF-8 character still incomplete; a tail that starts a
        # stop string may yet be removed. Neither may be streamed yet.
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == "\ufffd":
            end -= 1
        head = self.text[:end]
        hold = max(
            (k for s in self.request.params.stop for k in range(1, len(s)) if head.endswith(s[:k])),
            default=0,
        )
        return end - hold

    def outcome(self) -> RequestOutcome:
        return RequestOutcome(
            request_id=self.request.id,
            text=self.text,
            finish_reason=self.finish_reason or "error",
            prompt_tokens=len(self.plan.prompt_ids) or self.request.prompt_len,
            completion_tokens=self.completion_tokens,
            started_at=self.started_at,
            finished_at=self.finished_at or now(),
            first_token_at=self.first_token_at,
            note=self.plan.note,
            error=self.error,
        )


class RowTracker(StoppingCriteria):
    """Feeds each decode step's tokens to the rows; tells ``generate`` which are done.

    ``on_step(step)`` runs first at every step (the fault-injection hook).
    """

    def __init__(
        self, rows: list[Row], eos_ids: Sequence[int], on_step: Callable[[int], None] | None
    ) -> None:
        self.rows = rows
        self.eos_ids = frozenset(eos_ids)
        self.on_step = on_step
        self.step = 0
        self._done: list[bool] = []
        self._done_tensor = torch.zeros(0, dtype=torch.bool)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: object
    ) -> torch.BoolTensor:
        self.step += 1
        if self.on_step is not None:
            self.on_step(self.step)
        stamp = now()
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if not row.finished:
                row.add(int(token), self.eos_ids, stamp)
        done = [row.finished for row in self.rows]
        if done != self._done:  # a host-to-device copy only when a row finished
            self._done = done
            self._done_tensor = torch.tensor(done, dtype=torch.bool, device=input_ids.device)
        return self._done_tensor  # type: ignore[return-value]

    def finish_all(self, stamp: float) -> None:
        for row in self.rows:
            row.finish_now(stamp)


class RowSampler(LogitsProcessor):
    """Picks every row's next token by its own parameters, in one batched pass.

    Greedy rows (temperature 0) take the argmax; the others sample from the
    temperature-scaled, top-p-filtered distribution (exponential race, i.e.
    ``argmax(p / E)`` with ``E ~ Exp(1)``; a seeded row draws ``E`` from its own
    generator, so its text doesn't depend on its batch). The scores returned are
    ``-inf`` but for the chosen token, so ``generate``'s greedy step takes it.
    """

    def __init__(self, rows: list[Row], device: str) -> None:
        params = [row.request.params for row in rows]
        self.all_greedy = all(p.temperature == 0 for p in params)
        self.greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
        temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
        self.temperature = torch.tensor(temps, device=device).unsqueeze(1)
        top_ps = [p.top_p if p.temperature > 0 else 1.0 for p in params]
        self.top_p = torch.tensor(top_ps, device=device).unsqueeze(1) if min(top_ps) < 1 else None
        self.seeded = [(i, _generator(row, device)) for i, row in enumerate(rows) if _seeded(row)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.all_greedy:
            return scores  # generate's argmax is the greedy choice already
        chosen = scores.argmax(dim=-1)
        probs = torch.softmax(scores / self.temperature, dim=-1)
        if self.top_p is not None:
            probs = _top_p(probs, self.top_p)
        race = torch.empty_like(probs).exponential_()
        for i, generator in self.seeded:
            race[i].exponential_(generator=generator)
        chosen = torch.where(self.greedy, chosen, (probs / race).argmax(dim=-1))
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter_(1, chosen.unsqueeze(1), 0.0)  # type: ignore[return-value]


def _seeded(row: Row) -> bool:
    return row.request.params.seed is not None and row.request.params.temperature > 0


def _generator(row: Row, device: str) -> torch.Generator:
    if row.generator is None:
        row.generator = torch.Generator(device=device)
        row.generator.manual_seed(int(row.request.params.seed or 0))
    return row.generator


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each row beyond its top-p mass (the top token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > top_p, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


class TextStreamer(BaseStreamer):
    """Hands the streaming rows' new text to ``on_text`` once per decode step.

    ``generate`` calls ``put`` with the prompt first (skipped), then with each step's
    tokens for the whole batch; the rows have already decoded them (``RowTracker``).
    A failing ``on_text`` is logged, never allowed to stop the batch.
    """

    def __init__(self, rows: list[Row], on_text: OnText) -> None:
        self.rows = [row for row in rows if row.streams]
        self.on_text = on_text
        self.prompt_seen = False
        self.failures = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.flush()

    def end(self) -> None:
        self.flush()

    def flush(self) -> None:
        deltas = [d for d in (row.take_delta() for row in self.rows) if d is not None]
        if not deltas:
            return
        try:
            self.on_text(deltas)
        except Exception:
            self.failures += 1
            if self.failures == 1:
                log.exception("on_text failed; streaming of this batch may be incomplete")
