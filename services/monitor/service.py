"""The monitor loop: read telemetry, publish it, append it to the capped stream, record it.

Each tick: :meth:`TelemetryReader.read` -> PUBLISH on ``Keys.telemetry_channel`` (live
readers) and XADD to ``Keys.telemetry_stream`` trimmed to about ``stream_maxlen``
entries (late readers such as the agent) -> submit to the records writer (off the loop,
never blocking). A Redis outage is logged and retried at the next tick; it never stops
the monitor. SIGTERM / SIGINT end the loop after the current tick.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import redis
from pydantic import BaseModel

from services.monitor.config import MonitorSettings
from services.monitor.nvml import TelemetryReader
from shared.keys import Keys
from shared.lifecycle import Stoppable
from shared.schemas import TelemetrySample, dump

log = logging.getLogger(__name__)

FIELD = "data"


class Recorder(Protocol):
    """What the monitor needs of the records writer: a non-blocking submit."""

    def submit(self, record: BaseModel) -> None: ...


class MonitorService(Stoppable):
    """Publishes one telemetry sample per ``interval_s`` until :meth:`stop`."""

    def __init__(
        self,
        settings: MonitorSettings,
        client: redis.Redis,
        reader: TelemetryReader,
        recorder: Recorder | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.reader = reader
        self.recorder = recorder
        self.keys = Keys(settings.key_prefix)
        super().__init__()
        self._redis_down = False

    def publish(self, sample: TelemetrySample) -> bool:
        """Send a sample to the channel and the capped stream; ``False`` if Redis failed."""
        raw = dump(sample)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.publish(self.keys.telemetry_channel, raw)
            pipe.xadd(
                self.keys.telemetry_stream,
                {FIELD: raw},
                maxlen=self.settings.stream_maxlen,
                approximate=True,
            )
            pipe.execute()
        except redis.RedisError as exc:
            if not self._redis_down:
                log.error("cannot publish telemetry (%s); retrying every tick", exc)
            self._redis_down = True
            return False
        if self._redis_down:
            log.info("Redis is back; telemetry published again")
        self._redis_down = False
        return True

    def tick(self) -> TelemetrySample:
        """Read, publish and record one sample."""
        sample = self.reader.read()
        self.publish(sample)
        if self.recorder is not None:
            self.recorder.submit(sample)
        return sample

    def run(self) -> None:
        """Tick at a fixed rate (no drift) until :meth:`stop` is called."""
        interval = self.settings.interval_s
        next_at = time.monotonic()
        log.info(
            "monitor started: %s, every %.2fs",
            "NVML" if self.reader.has_gpu else "host only (no GPU)",
            interval,
        )
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:  # a bad reading must not end the monitor
                log.exception("telemetry tick failed")
            next_at = max(next_at + interval, time.monotonic())
            self.stopping.wait(max(0.0, next_at - time.monotonic()))
        log.info("monitor stopped")
