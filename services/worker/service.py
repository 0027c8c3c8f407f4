"""The worker service: a thin Redis I/O shell around the engine core.

One worker serves one model on one device and is one consumer of the request stream.
Each iteration of :class:`~services.worker.loop.ServingLoop` applies the agent's
settings when their version changed, pulls as many requests as the core can admit
(``XREADGROUP``, blocking only when idle), runs one engine step, publishes every
streaming request's new text and every finished answer (publish-once), acks the
finished, and records a window of steps as one cycle. The worker decides nothing beyond
the engine's own scheduling and its OOM recovery.

Delivery is at-least-once: an entry is acked only after its answer is published; a
redelivered request whose answer exists is acked without running; the claims of every
request the core holds are kept fresh by the heartbeat thread. A step's output whose
publishing a Redis error interrupted is kept and published first once Redis answers
(each part once: the core has already let go of those requests). On stop, requests that
never ran are handed back at once, the running ones get ``drain_timeout_s`` to finish,
and what is left is handed back too (another worker recomputes it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import redis

from services.worker.config import WorkerSettings
from services.worker.core.engine import StepOutput
from services.worker.loop import ServingCore, ServingLoop
from services.worker.metrics import WorkerMetrics
from services.worker.model import LoadedModel, model_info
from services.worker.rows import RequestOutcome
from services.worker.stats import gpu_index, gpu_uuid
from services.worker.window import StepWindow, WindowContext
from shared.control import ControlStore
from shared.db.writer import RecordWriter
from shared.events import publish_event
from shared.keys import Keys
from shared.queue import Delivery, WorkerQueue
from shared.schemas import (
    ControlSettings,
    GenerationRequest,
    GenerationResult,
    RequestRecord,
    WorkerInfo,
    dump,
)

log = logging.getLogger(__name__)

REDIS_RETRY_MAX_S = 5.0


class Worker:
    """Serves requests from the stream until :meth:`stop` is called."""

    def __init__(
        self,
        settings: WorkerSettings,
        client: redis.Redis,
        writer: RecordWriter,
        loaded: LoadedModel,
        core: ServingCore,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics(settings.worker_id)
        self.client = client
        self.writer = writer
        self.loaded = loaded
        self.core = core
        self.keys = Keys(settings.key_prefix)
        self.queue = WorkerQueue(
            client,
            self.keys,
            settings.consumer_name,
            visibility_timeout_s=settings.visibility_timeout_s,
            max_deliveries=settings.max_deliveries,
        )
        self.control = ControlStore(client, self.keys)
        self.held: dict[str, Delivery] = {}  # request id -> its stream entry, while in the core
        self.loop = ServingLoop(core, self, settings.record_interval_s)
        self.cycles = 0
        self._settings: ControlSettings | None = None
        self._settings_read_at = 0.0
        self._stop = threading.Event()
        self._held_lock = threading.Lock()
        self._undelivered: deque[_Undelivered] = deque()
        self._redis_failures = 0

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking requests; finish or hand back what is held, then return from run()."""
        self._stop.set()

    def run(self) -> None:
        captured = self.loop.prepare()
        if captured:
            log.info("captured %d decode graphs", captured)
        self.announce()
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        try:
            while not self._stop.is_set():
                self._iterate()
            self._drain()
        finally:
            self._hand_back(list(self.held))
            self.client.delete(self.keys.worker_alive(self.settings.worker_id))
            log.info("worker %s stopped after %d cycles", self.settings.worker_id, self.cycles)

    def announce(self) -> None:
        """Publish the model served (for the gateway) and register this worker."""
        info = model_info(self.loaded)
        self.client.set(self.keys.model_info, dump(info))
        worker = WorkerInfo(
            worker_id=self.settings.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=self.loaded.device,
            gpu_index=gpu_index(self.loaded.device),
            gpu_uuid=gpu_uuid(self.loaded.device),
            gpu_name=_gpu_name(self.loaded.device),
            model=self.loaded.name,
            synthetic=self.loaded.synthetic,
            context_length=self.loaded.context_length,
        )
        self.client.hset(self.keys.workers, self.settings.worker_id, dump(worker))
        self.writer.submit(worker)
        self._beat()

    def _beat(self) -> None:
        self.client.set(
            self.keys.worker_alive(self.settings.worker_id), "1", ex=self.settings.heartbeat_ttl_s
        )

    def _heartbeat(self) -> None:
        """Keep the liveness key and the claims on held requests fresh."""
        while not self._stop.wait(self.settings.claim_refresh_s):
            try:
                self._beat()
                with self._held_lock:
                    held = [d.entry_id for d in self.held.values()]
                self.queue.refresh_claims(held)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _iterate(self) -> None:
        """One loop iteration; a Redis error is recoverable (the model stays loaded, the
        running requests stay in the core), anything else ends the process."""
        try:
            self._deliver_backlog()  # a step's output a Redis error held back, first
            self.loop.iterate()
            self._redis_failures = 0
        except redis.RedisError as exc:
            self._redis_failures += 1
            wait = min(REDIS_RETRY_MAX_S, 0.1 * 2**self._redis_failures)
            log.warning("Redis error (%s): retrying in %.1f s", exc, wait)
            self._stop.wait(wait)

    def _drain(self) -> None:
        """On stop: hand back what never ran, let the running finish for a while."""
        self._hand_back(self.core.take_unstarted())
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.core.has_work and time.monotonic() < deadline:
            self.loop.iterate(accept=False)
        self.loop.flush()

    def _hand_back(self, request_ids: list[str]) -> None:
        """Make these requests immediately reclaimable by other workers."""
        with self._held_lock:
            entries = [self.held.pop(r).entry_id for r in request_ids if r in self.held]
        if entries:
            self.queue.release(entries)
            log.info("handed back %d request(s)", len(entries))

    # -- LoopIO: what the serving loop reads and writes -----------------------------------

    def current_settings(self) -> ControlSettings:
        """The agent's settings, read at most every ``settings_poll_s`` (a Redis read)."""
        fresh = time.monotonic() - self._settings_read_at < self.settings.settings_poll_s
        if self._settings is not None and fresh:
            return self._settings
        current = self.control.read(self.settings.worker_id)
        if current is None:
            current = self.control.write(self.settings.worker_id, self._initial_settings())
        if self._settings is None or current.version != self._settings.version:
            self.metrics.settings(current)
        self._settings, self._settings_read_at = current, time.monotonic()
        return current

    def _initial_settings(self) -> ControlSettings:
        return ControlSettings(
            batch_size=self.settings.batch_size,
            max_seq_len=self.settings.max_seq_len or self.loaded.context_length,
            precision=self.loaded.precision,
            max_batched_tokens=self.settings.max_batched_tokens,
            kv_budget_bytes=self.settings.kv_budget_bytes,
            reason="initial settings of the worker",
        )

    def pull(self, count: int, block: bool) -> list[GenerationRequest]:
        pulled = self.queue.pull(count, block_ms=self.settings.poll_block_ms if block else 0)
        if not pulled:
            return []
        answered = self.queue.answered([d.request.id for d in pulled])
        self.queue.ack([d.entry_id for d in pulled if d.request.id in answered])
        fresh = []
        for delivery in pulled:
            if delivery.request.id in answered or delivery.request.id in self.held:
                continue  # answered already, or a reclaim of a request we still run
            if delivery.deliveries > self.settings.max_deliveries:
                why = f"the worker holding it died {delivery.deliveries - 1} times"
                self.queue.dead_letter(delivery, why, self.loaded.name, self.settings.worker_id)
                log.error("request %s dead-lettered: %s", delivery.request.id, why)
                continue
            with self._held_lock:
                self.held[delivery.request.id] = delivery
            fresh.append(delivery.request)
        return fresh

    def cancelled(self, request_ids: list[str]) -> set[str]:
        return self.queue.cancelled(request_ids)

    def deliver(self, output: StepOutput) -> None:
        """Publish a step's output, after any earlier one a Redis error held back: the
        core has let go of its finished requests, so their answers must not be lost."""
        self.metrics.step(output.stats)
        self._undelivered.append(_Undelivered(output))
        self._deliver_backlog()

    def _deliver_backlog(self) -> None:
        while self._undelivered:
            self._publish(self._undelivered[0])  # raises on a Redis error: kept for retry
            self._undelivered.popleft()

    def _publish(self, pending: _Undelivered) -> None:
        """Each part once, in order, across retries (deltas, OOM event, answers + acks;
        the answers are publish-once in Redis themselves)."""
        output = pending.output
        if output.deltas and not pending.deltas_sent:
            self.queue.publish_deltas(output.deltas)
            pending.deltas_sent = True
        if output.stats.oom is not None and not pending.oom_sent:
            self._on_oom(output)
            pending.oom_sent = True
        if not output.finished:
            return
        with self._held_lock:  # popped once published: a retry finds them here still
            pairs = [(o, self.held[o.request_id]) for o in output.finished]
        if pending.answers is None:
            answers = [
                o.to_result(d.request, self.loaded.name, self.settings.worker_id) for o, d in pairs
            ]
            pending.answers = answers, self.queue.publish_results(answers)
            self._count_answers(pairs, *pending.answers)
        self.queue.ack([d.entry_id for _, d in pairs])
        with self._held_lock:
            for outcome, _ in pairs:
                self.held.pop(outcome.request_id, None)

    def _count_answers(
        self,
        pairs: list[tuple[RequestOutcome, Delivery]],
        answers: list[GenerationResult],
        published: list[bool],
    ) -> None:
        for (_, delivery), result, first in zip(pairs, answers, published, strict=True):
            if first:  # a redelivery that lost the race is neither counted nor recorded
                self.metrics.result(result)
                self.writer.submit(self._request_record(delivery.request, result))
            else:  # ran twice: its claim lapsed while held here (or a duplicate entry)
                log.warning("request %s was answered already by another delivery: this "
                            "run's answer is dropped", result.request_id)  # fmt: skip

    def record(self, window: StepWindow, loop: ServingLoop) -> None:
        ctx = WindowContext(
            worker_id=self.settings.worker_id,
            device=self.loaded.device,
            settings=loop.applied,
            queue_depth=self.queue.depth(),
            precision_saved_bytes=self.core.take_precision_saved(),
        )
        cycle = window.flush(self.core.stats(), ctx)
        self.cycles += 1
        self.metrics.cycle(cycle)
        publish_event(self.client, self.keys, cycle, self.settings.events_maxlen)
        self.writer.submit(cycle)
        # The share of the window spent in engine steps: the rest is this shell's I/O
        # (Redis, records) and waiting for requests.
        busy = cycle.steps * (cycle.step_time_mean_s or 0.0) / max(cycle.latency_s, 1e-9)
        log.info(
            "cycle %d: %d steps, %d tok = %.1f tok/s, engine busy %.0f%%, running %d (max %d), "
            "waiting %d, KV %.0f%%, %d preempted, %s, v%d%s",
            self.cycles, cycle.steps, cycle.tokens_generated, cycle.tokens_per_s, 100 * busy,
            cycle.running, cycle.batch_size, cycle.waiting, 100 * cycle.kv_usage,
            cycle.preemptions, cycle.precision, cycle.settings_version,
            f", {cycle.oom_events} OOM" if cycle.oom_events else "",
        )  # fmt: skip

    # -- answers and events ---------------------------------------------------------------

    def _on_oom(self, output: StepOutput) -> None:
        info = output.stats.oom
        assert info is not None
        event = info.to_event(self.settings.worker_id, gpu_index(self.loaded.device),
                              self.core.precision, self.loop.applied.version)  # fmt: skip
        publish_event(self.client, self.keys, event, self.settings.events_maxlen)
        log.warning("OOM in a step of %d sequences: %s", info.batch_size, info.action)
        self.metrics.oom()
        self.writer.submit(event)

    def _request_record(
        self, request: GenerationRequest, result: GenerationResult
    ) -> RequestRecord:
        return RequestRecord(
            request_id=request.id,
            worker_id=self.settings.worker_id,
            kind=request.kind,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            queued_at=result.queued_at,
            started_at=result.started_at,
            first_token_at=result.first_token_at,
            finished_at=result.finished_at,
            settings_version=self.loop.applied.version,
        )


@dataclass
class _Undelivered:
    """A step's output not yet wholly published, and the parts that were."""

    output: StepOutput
    deltas_sent: bool = False
    oom_sent: bool = False
    answers: tuple[list[GenerationResult], list[bool]] | None = None  # and which were first


def _gpu_name(device: str) -> str | None:
    index = gpu_index(device)
    if index is None:
        return None
    import torch

    return str(torch.cuda.get_device_name(index))
