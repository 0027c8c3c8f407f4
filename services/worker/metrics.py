"""Prometheus metrics of a worker, served on ``AEGIS_WORKER_METRICS_PORT`` (``/metrics``).

Fed from the same figures that go to the records: every engine step (tokens, running
and waiting requests, KV cache usage, preemptions, step time), every window of steps
(:class:`CycleStats`) and every answer (time to first token, inter-token latency,
end-to-end latency), so the dashboard and Prometheus never disagree. Names follow
vLLM's where one fits (``vllm:num_requests_running`` -> ``aegis_worker_num_requests_running``).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

from services.worker.core.engine import StepStats
from shared.schemas import ControlSettings, CycleStats, GenerationResult

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
PRECISIONS = ["fp32", "bf16", "fp16", "int8"]


class WorkerMetrics:
    """The worker's metrics in their own registry (one per worker process)."""

    def __init__(self, worker_id: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["worker"]
        r = self.registry
        self.cycles = Counter(
            "aegis_worker_cycles", "Windows of steps recorded", labels, registry=r
        )
        self.steps = Counter("aegis_worker_steps", "Engine steps run", labels, registry=r)
        self.requests = Counter(
            "aegis_worker_requests", "Requests answered", [*labels, "finish_reason"], registry=r
        )
        self.tokens = Counter(
            "aegis_worker_generation_tokens", "Tokens generated", labels, registry=r
        )
        self.prompt_tokens = Counter(
            "aegis_worker_prompt_tokens", "Prompt tokens computed (prefill)", labels, registry=r
        )
        self.preemptions = Counter(
            "aegis_worker_num_preemptions", "Sequences preempted for KV blocks", labels,
            registry=r,
        )  # fmt: skip
        self.running = Gauge(
            "aegis_worker_num_requests_running", "Sequences in the running batch", labels,
            registry=r,
        )  # fmt: skip
        self.waiting = Gauge(
            "aegis_worker_num_requests_waiting", "Sequences waiting in the engine", labels,
            registry=r,
        )  # fmt: skip
        self.kv_usage = Gauge(
            "aegis_worker_kv_cache_usage_perc", "Share of KV blocks in use (0-1)", labels,
            registry=r,
        )  # fmt: skip
        self.kv_blocks = Gauge(
            "aegis_worker_kv_cache_blocks", "KV blocks of the pool", labels, registry=r
        )
        self.step_time = Histogram(
            "aegis_worker_step_seconds", "Engine step time", labels,
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "aegis_worker_inter_token_latency_seconds", "Mean time between tokens, per request",
            labels, buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "aegis_worker_e2e_request_latency_seconds", "Queued to finished", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ooms = Counter("aegis_worker_oom_events", "CUDA OOMs caught", labels, registry=r)
        self.tokens_per_s = Gauge(
            "aegis_worker_tokens_per_second", "Tokens/s of the last batch", labels, registry=r
        )
        self.batch_size = Gauge(
            "aegis_worker_batch_size", "Most sequences running at once in the last window",
            labels, registry=r,
        )  # fmt: skip
        self.batch_setting = Gauge(
            "aegis_worker_batch_size_setting", "Max concurrent sequences in force", labels,
            registry=r,
        )  # fmt: skip
        self.max_seq_len = Gauge(
            "aegis_worker_max_seq_len_tokens", "Max sequence length in force", labels, registry=r
        )
        self.version = Gauge(
            "aegis_worker_settings_version", "Control settings version", labels, registry=r
        )
        self.precision = Enum(
            "aegis_worker_precision", "Precision in force", labels, states=PRECISIONS, registry=r
        )
        self.queue_depth = Gauge(
            "aegis_worker_queue_depth", "Requests in the stream", labels, registry=r
        )
        self.memory = Gauge(
            "aegis_worker_gpu_memory_bytes", "GPU memory of the last batch", [*labels, "kind"],
            registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "aegis_worker_queue_wait_seconds", "Queued to started", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "aegis_worker_time_to_first_token_seconds", "Queued to first token", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.worker_id = worker_id

    def serve(self, port: int, host: str = "0.0.0.0") -> bool:
        """Serve ``/metrics``; False (logged) when the port is taken: inference goes on."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("worker metrics not served on port %d: %s", port, exc)
            return False
        log.info("worker metrics on http://%s:%d/metrics", host, port)
        return True

    def settings(self, applied: ControlSettings) -> None:
        w = self.worker_id
        self.batch_setting.labels(w).set(applied.batch_size)
        self.max_seq_len.labels(w).set(applied.max_seq_len)
        self.version.labels(w).set(applied.version)
        self.precision.labels(w).state(applied.precision)

    def step(self, stats: StepStats) -> None:
        """One engine step: counters and gauges move in real time."""
        w = self.worker_id
        self.steps.labels(w).inc()
        self.tokens.labels(w).inc(stats.sampled)
        self.prompt_tokens.labels(w).inc(stats.prefill_tokens)
        if stats.preemptions:
            self.preemptions.labels(w).inc(stats.preemptions)
        self.running.labels(w).set(stats.running)
        self.waiting.labels(w).set(stats.waiting)
        total = stats.kv_blocks_total
        self.kv_usage.labels(w).set(stats.kv_blocks_used / total if total else 0.0)
        self.kv_blocks.labels(w).set(total)
        self.step_time.labels(w).observe(stats.seconds)

    def cycle(self, cycle: CycleStats) -> None:
        w = self.worker_id
        self.cycles.labels(w).inc()
        self.tokens_per_s.labels(w).set(cycle.tokens_per_s)
        self.batch_size.labels(w).set(cycle.batch_size)
        self.queue_depth.labels(w).set(cycle.queue_depth)
        for kind in ("allocated", "peak", "reserved"):
            value = getattr(cycle, f"memory_{kind}_bytes")
            if value is not None:
                self.memory.labels(w, kind).set(value)

    def result(self, result: GenerationResult) -> None:
        w = self.worker_id
        self.requests.labels(w, result.finish_reason).inc()
        self.queue_wait.labels(w).observe(max(0.0, result.started_at - result.queued_at))
        self.e2e.labels(w).observe(max(0.0, result.finished_at - result.queued_at))
        if result.first_token_at is not None:
            self.ttft.labels(w).observe(max(0.0, result.first_token_at - result.queued_at))
            if result.completion_tokens > 1:
                decode_s = result.finished_at - result.first_token_at
                self.itl.labels(w).observe(max(0.0, decode_s / (result.completion_tokens - 1)))

    def oom(self) -> None:
        self.ooms.labels(self.worker_id).inc()
