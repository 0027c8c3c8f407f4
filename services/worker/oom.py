"""Surviving CUDA out-of-memory: split the batch and retry, fail only what can't fit.

:func:`run_with_oom_guard` runs a batch; on OOM it frees memory, splits the batch in
halves and runs each half under the same guard, down to ``min_batch`` rows. A batch
that still runs out of memory at that size gets an error outcome (built by
``on_fail``); every other request is answered. Each OOM caught is reported through
``on_oom`` as an :class:`OomInfo` at the moment it is caught.

:class:`OomInjector` is the fault-injection hook for tests and benchmarks on machines
without a GPU (or to rehearse W4 on one): an engine given one raises a real
``torch.OutOfMemoryError`` when a batch is over a row or token bound, so the guard
exercised is the production one. The worker builds it from its settings (e.g.
``inject_oom_above_tokens``); it is off unless configured.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import torch

from services.worker.engine import failed_outcome
from services.worker.precision import free_memory
from shared.schemas import GenerationRequest, OomEvent, Precision

log = logging.getLogger(__name__)

O = TypeVar("O")  # noqa: E741 - the outcome type of one batch run

MESSAGE_CHARS = 300


@dataclass(frozen=True)
class OomInfo:
    """One out-of-memory caught by the guard.

    ``recovered`` is True when the guard kept the work alive by splitting the batch
    (each half is retried and reports its own OOM if it has one) and False when the
    batch was at ``min_batch`` and its requests were failed.
    """

    batch_size: int
    max_prompt_len: int
    max_new_tokens: int
    recovered: bool
    action: str
    message: str

    def to_event(
        self, worker_id: str, gpu_index: int | None, precision: Precision, settings_version: int
    ) -> OomEvent:
        """The record of this OOM (events stream, ``oom_events`` table)."""
        return OomEvent(
            worker_id=worker_id, gpu_index=gpu_index, batch_size=self.batch_size,
            max_prompt_len=self.max_prompt_len, max_new_tokens=self.max_new_tokens,
            precision=precision, settings_version=settings_version, recovered=self.recovered,
            action=self.action, message=self.message,
        )  # fmt: skip


def is_oom(exc: BaseException) -> bool:
    """True for CUDA OOM and for backends that signal it as a plain RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_with_oom_guard(
    run: Callable[[list[GenerationRequest]], O],
    batch: list[GenerationRequest],
    on_oom: Callable[[OomInfo], None],
    on_fail: Callable[[list[GenerationRequest], str], O] | None = None,
    min_batch: int = 1,
) -> list[O]:
    """Run ``batch``; return the outcomes of the (sub-)batches that ran, in order.

    ``on_fail(requests, message)`` builds the outcome for requests that can't be
    served (OOM at ``min_batch`` rows); by default an engine ``BatchOutcome`` of
    error results (use ``engine.fail`` to also drop the engine's kept progress).
    Exceptions other than OOM propagate.
    """
    if not batch:
        return []
    message = ""
    try:
        return [run(batch)]
    except Exception as exc:
        if not is_oom(exc):
            raise
        message = str(exc)[:MESSAGE_CHARS]
    # Out of the except block: the traceback and the tensors its frames held are gone.
    free_memory()
    if len(batch) <= max(min_batch, 1):
        _report(on_oom, batch, False, f"failed {len(batch)} request(s)", message)
        error = f"out of memory: {message}"
        return [on_fail(batch, error) if on_fail else cast(O, failed_outcome(batch, error, "fp32"))]
    half = (len(batch) + 1) // 2
    _report(on_oom, batch, True, f"split {len(batch)} -> {half}+{len(batch) - half}", message)
    first = run_with_oom_guard(run, batch[:half], on_oom, on_fail, min_batch)
    return first + run_with_oom_guard(run, batch[half:], on_oom, on_fail, min_batch)


def _report(
    on_oom: Callable[[OomInfo], None],
    batch: Sequence[GenerationRequest],
    recovered: bool,
    action: str,
    message: str,
) -> None:
    info = OomInfo(
        batch_size=len(batch),
        max_prompt_len=max(r.prompt_len for r in batch),
        max_new_tokens=max(r.params.max_tokens for r in batch),
        recovered=recovered,
        action=action,
        message=message,
    )
    log.warning("CUDA out of memory at batch %d: %s", info.batch_size, action)
    on_oom(info)


class OomInjector:
    """Raises ``torch.OutOfMemoryError`` for batches over a bound (test/benchmark hook).

    A batch is "over" when it has more than ``max_rows`` rows or more than
    ``max_tokens`` padded tokens (rows x (longest input + max new tokens)). The error
    is raised at decode step ``at_step`` (0 = before prefill; later steps leave partial
    progress, as a real OOM from a growing KV cache does). ``times`` bounds how many
    errors are injected (None = no bound). Thread-safe; ``injected`` counts them.
    """

    def __init__(
        self,
        max_rows: int | None = None,
        max_tokens: int | None = None,
        at_step: int = 0,
        times: int | None = None,
    ) -> None:
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.at_step = at_step
        self.times = times
        self.injected = 0
        self._lock = threading.Lock()

    def over(self, rows: int, padded_tokens: int) -> bool:
        """Whether a batch of this size would be failed."""
        too_many_rows = self.max_rows is not None and rows > self.max_rows
        too_many_tokens = self.max_tokens is not None and padded_tokens > self.max_tokens
        return too_many_rows or too_many_tokens

    def maybe_raise(self, rows: int, padded_tokens: int, step: int) -> None:
        """Called by the engine before prefill (step 0) and after each decode step."""
        if step != self.at_step or not self.over(rows, padded_tokens):
            return
        with self._lock:
            if self.times is not None and self.injected >= self.times:
                return
            self.injected += 1
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected: {rows} rows, {padded_tokens} padded tokens, "
            f"bounds rows={self.max_rows} tokens={self.max_tokens})"
        )
