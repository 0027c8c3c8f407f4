"""Every Redis key, channel and stream name AEGIS uses, in one place.

All names start with a configurable prefix so that deployments and test runs can share
one Redis server without seeing each other's data.
"""

from __future__ import annotations

from dataclasses import dataclass

WORKER_GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``AEGIS_KEY_PREFIX``, default ``aegis``)."""

    prefix: str = "aegis"

    @property
    def requests(self) -> str:
        """Stream of generation requests, consumed by the ``workers`` group."""
        return f"{self.prefix}:requests"

    def result(self, request_id: str) -> str:
        """Per-request stream of result events (token deltas, then the final result)."""
        return f"{self.prefix}:result:{request_id}"

    def result_wake(self, reader: str) -> str:
        """A gateway reader's own stream: an entry wakes its blocking read of the result
        streams so that it reads the streams of requests that arrived since."""
        return f"{self.prefix}:result-wake:{reader}"

    def done(self, request_id: str) -> str:
        """Set once a request's final result is published: a redelivery is answered once."""
        return f"{self.prefix}:done:{request_id}"

    def cancel(self, request_id: str) -> str:
        """Set (with a TTL) when a request's client left or its deadline passed."""
        return f"{self.prefix}:cancel:{request_id}"

    @property
    def cancels(self) -> str:
        """A counter raised with every batch of cancel keys: workers re-read those of
        their running requests only when it moved (not every step)."""
        return f"{self.prefix}:cancels"

    def idempotency(self, scope: str) -> str:
        """An ``Idempotency-Key``'s record (the first run's requests, then its results)."""
        return f"{self.prefix}:idempotency:{scope}"

    @property
    def dead_letters(self) -> str:
        """Capped stream of requests given up after too many failed deliveries."""
        return f"{self.prefix}:dead-letters"

    @property
    def dead_letter_count(self) -> str:
        """Counter of every dead letter ever written (the stream itself is capped)."""
        return f"{self.prefix}:dead-letters:count"

    def control(self, worker_id: str) -> str:
        """Hash holding the versioned control settings of one worker."""
        return f"{self.prefix}:control:{worker_id}"

    @property
    def control_channel(self) -> str:
        """Pub/sub channel announcing that a worker's control hash changed."""
        return f"{self.prefix}:control"

    @property
    def telemetry_channel(self) -> str:
        """Pub/sub channel of monitor telemetry samples."""
        return f"{self.prefix}:telemetry"

    @property
    def telemetry_stream(self) -> str:
        """Capped stream of telemetry samples (for late readers such as the agent)."""
        return f"{self.prefix}:telemetry:log"

    @property
    def events_stream(self) -> str:
        """Capped stream of worker events (cycle stats, OOMs) consumed by the agent."""
        return f"{self.prefix}:events"

    def worker_alive(self, worker_id: str) -> str:
        """Heartbeat key of a worker, with a TTL: gone when the worker is dead."""
        return f"{self.prefix}:worker:{worker_id}:alive"

    @property
    def workers(self) -> str:
        """Hash worker id -> JSON description (GPU, model) of every worker seen."""
        return f"{self.prefix}:workers"

    @property
    def model_info(self) -> str:
        """JSON of the model served (name, synthetic flag, context, tokenizer)."""
        return f"{self.prefix}:model"

    @property
    def rq_queue(self) -> str:
        """Name of the RQ queue running batch jobs."""
        return f"{self.prefix}-jobs"
