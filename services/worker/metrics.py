"""Prometheus metrics of a worker, served on ``AEGIS_WORKER_METRICS_PORT`` (``/metrics``).

Fed from the same figures that go to the records (one :class:`CycleStats` per batch,
one result per request), so the dashboard and Prometheus never disagree.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

from shared.schemas import ControlSettings, CycleStats, GenerationResult

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PRECISIONS = ["fp32", "bf16", "fp16", "int8"]


class WorkerMetrics:
    """The worker's metrics in their own registry (one per worker process)."""

    def __init__(self, worker_id: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["worker"]
        r = self.registry
        self.cycles = Counter("aegis_worker_cycles", "Batches run", labels, registry=r)
        self.requests = Counter(
            "aegis_worker_requests", "Requests answered", [*labels, "finish_reason"], registry=r
        )
        self.tokens = Counter(
            "aegis_worker_tokens_generated", "Tokens generated", labels, registry=r
        )
        self.ooms = Counter("aegis_worker_oom_events", "CUDA OOMs caught", labels, registry=r)
        self.tokens_per_s = Gauge(
            "aegis_worker_tokens_per_second", "Tokens/s of the last batch", labels, registry=r
        )
        self.batch_size = Gauge(
            "aegis_worker_batch_size", "Rows in the last batch", labels, registry=r
        )
        self.batch_setting = Gauge(
            "aegis_worker_batch_size_setting", "Batch size in force", labels, registry=r
        )
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
        self.padding = Gauge(
            "aegis_worker_padding_ratio", "Padding share of the last batch", labels, registry=r
        )
        self.memory = Gauge(
            "aegis_worker_gpu_memory_bytes", "GPU memory of the last batch", [*labels, "kind"],
            registry=r,
        )  # fmt: skip
        self.batch_latency = Histogram(
            "aegis_worker_batch_latency_seconds", "Batch latency", labels,
            buckets=LATENCY_BUCKETS, registry=r,
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

    def cycle(self, cycle: CycleStats) -> None:
        w = self.worker_id
        self.cycles.labels(w).inc()
        self.tokens.labels(w).inc(cycle.tokens_generated)
        self.tokens_per_s.labels(w).set(cycle.tokens_per_s)
        self.batch_size.labels(w).set(cycle.batch_size)
        self.queue_depth.labels(w).set(cycle.queue_depth)
        self.padding.labels(w).set(cycle.padding_ratio)
        self.batch_latency.labels(w).observe(cycle.latency_s)
        for kind in ("allocated", "peak", "reserved"):
            value = getattr(cycle, f"memory_{kind}_bytes")
            if value is not None:
                self.memory.labels(w, kind).set(value)

    def result(self, result: GenerationResult) -> None:
        w = self.worker_id
        self.requests.labels(w, result.finish_reason).inc()
        self.queue_wait.labels(w).observe(max(0.0, result.started_at - result.queued_at))
        if result.first_token_at is not None:
            self.ttft.labels(w).observe(max(0.0, result.first_token_at - result.queued_at))

    def oom(self) -> None:
        self.ooms.labels(self.worker_id).inc()
