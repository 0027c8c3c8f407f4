"""The worker loop: settings -> pull -> schedule -> run (OOM-guarded) -> answer -> record -> ack.

One worker serves one model on one device and is one consumer of the request stream.
It never makes policy decisions beyond the OOM guard: batch size, max sequence length
and precision come from the agent's control hash, read at every batch boundary.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import redis

from services.worker.config import WorkerSettings
from services.worker.engine import (
    BatchLimits,
    BatchOutcome,
    Engine,
    RequestOutcome,
    combine_outcomes,
)
from services.worker.metrics import WorkerMetrics
from services.worker.model import LoadedModel, model_info
from services.worker.oom import OomInfo, run_with_oom_guard
from services.worker.precision import PrecisionUnavailable
from services.worker.scheduler import select_batch
from services.worker.stats import CycleContext, cycle_stats, gpu_index
from shared.control import ControlStore
from shared.db.writer import RecordWriter
from shared.events import publish_event
from shared.keys import Keys
from shared.queue import Delivery, WorkerQueue
from shared.schemas import (
    ControlSettings,
    GenerationRequest,
    GenerationResult,
    OomEvent,
    Precision,
    RequestRecord,
    WorkerInfo,
    dump,
    now,
)

log = logging.getLogger(__name__)


class Worker:
    """Runs batches from the stream until :meth:`stop` is called."""

    def __init__(
        self,
        settings: WorkerSettings,
        client: redis.Redis,
        writer: RecordWriter,
        loaded: LoadedModel,
        engine: Engine,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics(settings.worker_id)
        self.client = client
        self.writer = writer
        self.loaded = loaded
        self.engine = engine
        self.keys = Keys(settings.key_prefix)
        self.queue = WorkerQueue(
            client,
            self.keys,
            settings.consumer_name,
            visibility_timeout_s=settings.visibility_timeout_s,
            max_deliveries=settings.max_deliveries,
        )
        self.control = ControlStore(client, self.keys)
        self.buffer: list[Delivery] = []
        self.inflight: list[Delivery] = []
        self.applied = ControlSettings(version=-1)
        self.cycles = 0
        self._precision_saved: int | None = None  # measured at a change, recorded once
        self._oom_events = 0
        self._stop = threading.Event()
        self._held_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the batch in flight, hand back what is buffered, then return from run()."""
        self._stop.set()

    def run(self) -> None:
        self.announce()
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        try:
            while not self._stop.is_set():
                self.step()
        finally:
            self._hand_back()
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
                    held = [d.entry_id for d in self.inflight + self.buffer]
                self.queue.refresh_claims(held)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _hand_back(self) -> None:
        """Make buffered, unstarted requests immediately reclaimable by other workers."""
        with self._held_lock:
            ids = [d.entry_id for d in self.buffer]
            self.buffer = []
        if ids:
            self.queue.release(ids)
            log.info("handed back %d buffered request(s)", len(ids))

    # -- one cycle -------------------------------------------------------------------

    def step(self) -> bool:
        """Run one batch if any request is waiting; False when there was nothing to do."""
        settings = self.current_settings()
        self._fill_buffer(settings)
        batch = self._take_batch(settings)
        if not batch:
            return False
        started = now()
        self._oom_events = 0  # counted by _on_oom while the guard runs the batch
        outcomes = self._run(batch, settings)
        self._answer(batch, [r for outcome in outcomes for r in outcome.results], settings)
        self._record_cycle(batch, outcomes, settings, started)
        return True

    def current_settings(self) -> ControlSettings:
        """The agent's settings (read at every batch boundary), applied when they changed."""
        settings = self.control.read(self.settings.worker_id)
        if settings is None:
            settings = self.control.write(self.settings.worker_id, self._initial_settings())
        if settings.version != self.applied.version:
            self._apply(settings)
        return self.applied

    def _initial_settings(self) -> ControlSettings:
        return ControlSettings(
            batch_size=self.settings.batch_size,
            max_seq_len=self.settings.max_seq_len or self.loaded.context_length,
            precision=self.loaded.precision,
            reason="initial settings of the worker",
        )

    def _apply(self, settings: ControlSettings) -> None:
        precision = self._switch_precision(settings.precision)
        max_seq = min(settings.max_seq_len, self.loaded.context_length)
        self.applied = settings.model_copy(update={"max_seq_len": max_seq, "precision": precision})
        self.metrics.settings(self.applied)
        log.info(
            "settings v%d applied: batch %d, max_seq_len %d, %s (%s)",
            settings.version,
            settings.batch_size,
            max_seq,
            settings.precision,
            settings.reason,
        )

    def _switch_precision(self, wanted: Precision) -> Precision:
        """Change the model's precision between batches; an unavailable one is refused."""
        if wanted == self.engine.precision:
            return wanted
        try:
            change = self.engine.set_precision(wanted)
        except PrecisionUnavailable as exc:
            log.error("settings ask for %s, which is unavailable (%s): staying at %s",
                      wanted, exc, self.engine.precision)  # fmt: skip
            return self.engine.precision
        self._precision_saved = change.bytes_saved
        log.info("precision %s -> %s: %s", change.before, change.after, change.describe())
        return change.after

    def _fill_buffer(self, settings: ControlSettings) -> None:
        want = int(settings.batch_size * self.settings.lookahead_factor) - len(self.buffer)
        if want <= 0:
            return
        block = 0 if self.buffer else self.settings.poll_block_ms
        pulled = self.queue.pull(want, block_ms=block)
        answered = self.queue.answered([d.request.id for d in pulled])
        self.queue.ack([d.entry_id for d in pulled if d.request.id in answered])
        held = {d.entry_id for d in self.buffer}
        fresh = [d for d in pulled if d.request.id not in answered and self._admit(d, held)]
        with self._held_lock:
            self.buffer.extend(fresh)

    def _admit(self, delivery: Delivery, held: set[str]) -> bool:
        """Drop what must not run: held already (a reclaim of our own), or failed too often."""
        if delivery.entry_id in held:
            return False
        if delivery.deliveries > self.settings.max_deliveries:
            self._fail(delivery, f"request failed {delivery.deliveries - 1} times (worker crashes)")
            return False
        return True

    def _fail(self, delivery: Delivery, error: str) -> None:
        request = delivery.request
        self.queue.publish_result(
            GenerationResult(
                request_id=request.id,
                text="",
                finish_reason="error",
                prompt_tokens=request.prompt_len,
                completion_tokens=0,
                model=self.loaded.name,
                worker_id=self.settings.worker_id,
                queued_at=request.enqueued_at,
                started_at=now(),
                error=error,
            )
        )
        self.queue.ack([delivery.entry_id])
        log.error("request %s failed: %s", request.id, error)

    def _take_batch(self, settings: ControlSettings) -> list[Delivery]:
        requests = [d.request for d in self.buffer]
        budget = self.settings.max_batch_tokens or None
        chosen = {r.id for r in select_batch(requests, settings.batch_size, budget)}
        with self._held_lock:
            self.inflight = [d for d in self.buffer if d.request.id in chosen]
            self.buffer = [d for d in self.buffer if d.request.id not in chosen]
        return self.inflight

    def _run(self, batch: list[Delivery], settings: ControlSettings) -> list[BatchOutcome]:
        """The engine's outcomes: one, or several when the OOM guard split the batch."""
        limits = BatchLimits(max_seq_len=settings.max_seq_len)
        requests = [d.request for d in batch]

        def run(part: list[GenerationRequest]) -> BatchOutcome:
            return self.engine.run(part, limits, on_text=self.queue.publish_deltas)

        return run_with_oom_guard(run, requests, on_oom=self._on_oom, on_fail=self.engine.fail)

    def _on_oom(self, info: OomInfo) -> None:
        self._oom_events += 1
        self.metrics.oom()
        event = OomEvent(
            worker_id=self.settings.worker_id,
            gpu_index=gpu_index(self.loaded.device),
            batch_size=info.batch_size,
            max_prompt_len=info.max_prompt_len,
            max_new_tokens=info.max_new_tokens,
            precision=self.applied.precision,
            settings_version=self.applied.version,
            recovered=info.recovered,
            action=info.action,
            message=info.message,
        )
        log.warning(
            "OOM at batch %d (prompt %d, new %d): %s",
            info.batch_size,
            info.max_prompt_len,
            info.max_new_tokens,
            info.action,
        )
        publish_event(self.client, self.keys, event, self.settings.events_maxlen)
        self.writer.submit(event)

    def _answer(
        self, batch: list[Delivery], results: list[RequestOutcome], settings: ControlSettings
    ) -> None:
        """Publish each answer (once), record it, then ack the whole batch."""
        by_id = {r.request_id: r for r in results}
        answers = [
            by_id[d.request.id].to_result(d.request, self.loaded.name, self.settings.worker_id)
            for d in batch
        ]
        published = self.queue.publish_results(answers)
        for delivery, result, first in zip(batch, answers, published, strict=True):
            if first:  # a redelivery that lost the race is neither counted nor recorded
                self.metrics.result(result)
                self.writer.submit(self._request_record(delivery.request, result, settings))
        self.queue.ack([d.entry_id for d in batch])
        with self._held_lock:
            self.inflight = []

    def _request_record(
        self, request: GenerationRequest, result: GenerationResult, settings: ControlSettings
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
            settings_version=settings.version,
        )

    def _record_cycle(
        self,
        batch: list[Delivery],
        outcomes: list[BatchOutcome],
        settings: ControlSettings,
        started: float,
    ) -> None:
        ctx = CycleContext(
            worker_id=self.settings.worker_id, device=self.loaded.device, settings=settings,
            latency_s=now() - started, queue_depth=self.queue.depth(),
            oom_events=self._oom_events, precision_saved_bytes=self._precision_saved,
        )  # fmt: skip
        combined = combine_outcomes(outcomes, self.engine.precision)
        cycle = cycle_stats(combined, [d.request for d in batch], ctx)
        self.cycles += 1
        self._precision_saved = None
        self.metrics.cycle(cycle)
        publish_event(self.client, self.keys, cycle, self.settings.events_maxlen)
        self.writer.submit(cycle)
        log.info(
            "cycle %d: batch %d, prompt<=%d, %d tok in %.2fs = %.1f tok/s, pad %.0f%%, %s, v%d%s",
            self.cycles,
            cycle.batch_size,
            cycle.max_prompt_len,
            cycle.tokens_generated,
            cycle.latency_s,
            cycle.tokens_per_s,
            100 * cycle.padding_ratio,
            cycle.precision,
            cycle.settings_version,
            f", {cycle.oom_events} OOM" if cycle.oom_events else "",
        )


def _gpu_name(device: str) -> str | None:
    index = gpu_index(device)
    if index is None:
        return None
    import torch

    return str(torch.cuda.get_device_name(index))
