"""One row of a batch: its plan, progress, per-row sampling, stopping and streaming.

The pieces :class:`~services.worker.engine.HFGenerateEngine` hands to HF ``generate``:
:class:`RowSampler` (a logits processor applying each row's temperature, top-p and
seed), :class:`RowTracker` (stopping criteria per row: EOS, stop strings, budgets) and
:class:`TextStreamer` (each streaming row's new text after every step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from shared.schemas import FinishReason, GenerationRequest, GenerationResult, TokenDelta, now

log = logging.getLogger(__name__)

OnText = Callable[[list[TokenDelta]], None]


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


def context_problem(request: GenerationRequest, context: int) -> str | None:
    """Why a request can never fit the model's context (None when it can); never cut."""
    total = request.prompt_len + request.params.max_tokens
    if total <= context:
        return None
    return (
        f"prompt ({request.prompt_len} tokens) + max_tokens ({request.params.max_tokens}) "
        f"= {total} exceeds the model's context length {context}"
    )


def cap_seq_len(wanted: int, context: int) -> int:
    """A max_seq_len setting within the model's context (0: the whole context)."""
    return min(wanted, context) if wanted > 0 else context


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
