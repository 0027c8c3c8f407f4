"""The engine core's interface over the batch-at-a-time HF ``generate`` engine.

For model architectures the paged runner does not cover (anything but Llama, Mistral
without a sliding window and Qwen2; see :mod:`services.worker.core.llama`), the worker
serves through this fallback: one step runs one whole batch of up to ``max_num_seqs``
waiting requests (padded, under the OOM guard that splits a batch and retries), so
requests join only between batches and streamed text arrives when the batch ends. The
contract is the core's: every request added is finished exactly once, a request that can
never fit is rejected with a clear error, one over the current ``max_seq_len`` waits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as Seq

from services.worker.core.engine import CoreConfig, CoreStats, StepOutput, StepStats
from services.worker.core.scheduler import Limits
from services.worker.engine import BatchLimits, HFGenerateEngine, failed_outcome
from services.worker.model import LoadedModel
from services.worker.oom import OomInfo, OomInjector, run_with_oom_guard
from services.worker.rows import RequestOutcome, cap_seq_len, context_problem, validate_prompt
from shared.schemas import ControlSettings, GenerationRequest, Precision, now


class BatchEngineCore:
    """Whole batches of HF ``generate`` behind ``add`` / ``step`` / ``apply``."""

    def __init__(
        self, loaded: LoadedModel, config: CoreConfig, fault: OomInjector | None = None
    ) -> None:
        self.loaded = loaded
        self.config = config
        self.engine = HFGenerateEngine(loaded, fault=fault)
        self.limits = Limits(config.max_num_seqs, config.max_batched_tokens,
                             cap_seq_len(config.max_seq_len, loaded.context_length))  # fmt: skip
        self.waiting: deque[tuple[GenerationRequest, float]] = deque()
        self._pending: list[RequestOutcome] = []
        self._precision_saved: int | None = None

    # -- requests -------------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        problem = validate_prompt(
            request.prompt_token_ids, self.loaded.model.config.vocab_size
        ) or context_problem(request, self.loaded.context_length)
        if problem:
            self._pending += failed_outcome([request], problem, self.precision).results
            return
        self.waiting.append((request, time.monotonic()))

    def abort(self, request_id: str) -> bool:
        """Cancel a waiting request (a running batch finishes as one)."""
        for entry in self.waiting:
            if entry[0].id == request_id:
                self.waiting.remove(entry)
                stamp = now()
                size = entry[0].prompt_len
                self._pending.append(
                    RequestOutcome(request_id, "", "cancelled", size, 0, stamp, stamp)
                )
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self._pending)

    def free_slots(self) -> int:
        return max(0, 2 * self.limits.max_num_seqs - len(self.waiting))

    def unfinished_ids(self) -> Seq[str]:
        return [request.id for request, _ in self.waiting]

    def take_unstarted(self) -> list[str]:
        ids = list(self.unfinished_ids())
        self.waiting.clear()
        return ids

    # -- one step = one batch -------------------------------------------------------------

    def step(self) -> StepOutput:
        started = time.perf_counter()
        finished, self._pending = self._pending + self._expire(), []
        batch = self._take_batch()
        stats = StepStats(ts=now(), seconds=0.0, running=len(batch))
        if batch:
            ooms: list[OomInfo] = []
            limits = BatchLimits(self.loaded.context_length, ignore_eos=self.config.ignore_eos)
            outcomes = run_with_oom_guard(
                lambda part: self.engine.run(part, limits), batch, on_oom=ooms.append,
                on_fail=self.engine.fail,
            )  # fmt: skip
            results = [r for outcome in outcomes for r in outcome.results]
            finished += results
            stats.sampled = sum(r.completion_tokens for r in results)
            stats.decode_tokens = stats.sampled
            stats.prefill_tokens = sum(r.prompt_len for r in batch)
            stats.max_prompt_len = max(r.prompt_len for r in batch)
            stats.mean_prompt_len = stats.prefill_tokens / len(batch)
            stats.max_new_tokens = max(r.params.max_tokens for r in batch)
            pairs = zip(results, batch, strict=True)
            stats.ttft_s = [r.first_token_at - q.enqueued_at for r, q in pairs if r.first_token_at]
            stats.oom = ooms[0] if ooms else None
        stats.seconds = time.perf_counter() - started
        stats.finished = len(finished)
        stats.waiting = len(self.waiting)
        return StepOutput(finished, [], stats)

    def _take_batch(self) -> list[GenerationRequest]:
        limit = self.limits.max_seq_len
        fits = [e for e in self.waiting if _total(e[0]) <= limit][: self.limits.max_num_seqs]
        for entry in fits:
            self.waiting.remove(entry)
        return [request for request, _ in fits]

    def _expire(self) -> list[RequestOutcome]:
        deadline = time.monotonic() - self.config.admission_timeout_s
        limit = self.limits.max_seq_len
        expired = [e for e in self.waiting if _total(e[0]) > limit and e[1] < deadline]
        for entry in expired:
            self.waiting.remove(entry)
        error = f"request exceeds the worker's current max_seq_len {limit}; waited for it to rise"
        return failed_outcome([e[0] for e in expired], error, self.precision).results

    # -- settings and statistics ----------------------------------------------------------

    def apply(self, settings: ControlSettings) -> list[str]:
        changes = []
        if settings.precision != self.precision:
            change = self.engine.set_precision(settings.precision)  # may raise
            self._precision_saved = change.bytes_saved
            changes.append(f"precision {change.before} -> {change.after}")
        limits = Limits(settings.batch_size,
                        settings.max_batched_tokens or self.config.max_batched_tokens,
                        cap_seq_len(settings.max_seq_len, self.loaded.context_length))  # fmt: skip
        if limits != self.limits:
            self.limits = limits
            changes.append(f"limits {limits}")
        return changes

    @property
    def precision(self) -> Precision:
        return self.engine.precision

    def stats(self) -> CoreStats:
        return CoreStats(running=0, waiting=len(self.waiting), kv_blocks_used=0,
                         kv_blocks_total=0, block_size=0, kv_bytes=0, preemptions=0,
                         limits=self.limits, precision=self.precision, memory=None)  # fmt: skip

    def take_precision_saved(self) -> int | None:
        saved, self._precision_saved = self._precision_saved, None
        return saved

    def warm_up(self) -> int:
        return 0


def _total(request: GenerationRequest) -> int:
    """The longest a request can get: prompt + max_tokens."""
    return request.prompt_len + request.params.max_tokens
