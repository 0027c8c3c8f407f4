"""Prometheus metrics of one gateway app (its own registry, so tests can run many apps).

:class:`MetricsMiddleware` counts every HTTP request by route template and status and
times it end to end (a stream ends when its last byte is sent); generation code reports
results through :meth:`GatewayMetrics.observe_result`.

With several gateway processes on one port (``AEGIS_GATEWAY_PROCESSES``), a scrape
reaches one of them at random: the supervisor then sets ``PROMETHEUS_MULTIPROC_DIR`` (a
fresh directory per start) for its processes, prometheus-client keeps every value in a
per-process file there, and ``/metrics`` renders all the files of the directory:
counters and histograms are summed over the processes; each gauge says how it combines
(``multiprocess_mode``, ignored in a single process).
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.schemas import GenerationRequest, GenerationResult

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """The gateway's collectors, registered in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        # Set for the processes of a multi-process gateway, before prometheus-client is
        # imported (it picks its file-backed values then): render every process's files.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.requests = Counter(
            "aegis_gateway_requests", "HTTP requests answered", ["route", "status"], registry=reg
        )
        self.latency = Histogram(
            "aegis_gateway_request_latency_seconds",
            "End-to-end HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "aegis_gateway_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "aegis_gateway_queue_wait_seconds",
            "Time a request waited in the queue before a worker started it",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        # Read from Redis by the process that answers the scrape, just before it renders
        # (or on a 429): the same for every process, so the latest value is the one.
        self.queue_depth = Gauge(
            "aegis_gateway_queue_depth",
            "Requests waiting in the stream",
            registry=reg,
            multiprocess_mode="mostrecent",
        )
        self.tokens = Counter(
            "aegis_gateway_tokens_generated", "Completion tokens generated", registry=reg
        )
        self.cancels = Counter(
            "aegis_gateway_cancelled_requests",
            "Requests whose work the gateway cancelled (client_left, deadline, shutdown, error)",
            ["reason"],
            registry=reg,
        )
        self.dead_letters = Gauge(
            "aegis_dead_letters",
            "Requests dead-lettered after too many failed deliveries (all workers, ever)",
            registry=reg,
            multiprocess_mode="mostrecent",
        )
        # 1 per serving process, summed over the live ones (the supervisor marks a process
        # that exits dead): how many processes share the port right now.
        self.processes = Gauge(
            "aegis_gateway_processes",
            "Gateway processes serving (their metrics are summed here)",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._scrape = reg
        if self.multiprocess_dir is not None:
            self._scrape = CollectorRegistry()
            MultiProcessCollector(self._scrape, path=self.multiprocess_dir)

    def observe_result(
        self, request: GenerationRequest, result: GenerationResult, first_token_at: float | None
    ) -> None:
        """Record one answered request; ``first_token_at`` as seen by the gateway if known."""
        self.tokens.inc(result.completion_tokens)
        self.queue_wait.observe(max(0.0, result.started_at - result.queued_at))
        first = first_token_at or result.first_token_at
        if first is not None:
            self.ttft.observe(max(0.0, first - request.enqueued_at))

    def render(self) -> bytes:
        """The exposition text: this app's registry, or every process's files."""
        return generate_latest(self._scrape)


def _route_label(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    # Unmatched paths share one label so that scanners can't grow the series without bound.
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware (streams pass through untouched; disconnects are harmless)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_label(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
