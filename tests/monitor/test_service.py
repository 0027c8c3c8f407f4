"""The monitor service on a real Redis: pub/sub, the capped stream, graceful stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import redis

from services.monitor.config import MonitorSettings
from services.monitor.nvml import TelemetryReader
from services.monitor.service import FIELD, MonitorService
from shared.db import RecordWriter, open_records
from shared.keys import Keys
from shared.schemas import TelemetrySample, load


def make_service(
    key_prefix: str, redis_url: str, interval_s: float = 1.0, stream_maxlen: int = 10000
) -> MonitorService:
    settings = MonitorSettings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        interval_s=interval_s,
        stream_maxlen=stream_maxlen,
    )
    return MonitorService(settings, redis.Redis.from_url(redis_url), TelemetryReader("t-host"))


def test_tick_publishes_and_appends(
    redis_client: redis.Redis, keys: Keys, key_prefix: str, redis_url: str
) -> None:
    service = make_service(key_prefix, redis_url)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.telemetry_channel)
    subscribed = pubsub.get_message(timeout=2.0)
    assert subscribed is not None and subscribed["type"] == "subscribe"
    sample = service.tick()
    message = pubsub.get_message(timeout=2.0)
    pubsub.close()
    assert message is not None and message["type"] == "message"
    published = load(TelemetrySample, message["data"])
    assert published == sample
    assert published.gpu == "none" and published.host_memory_total_bytes > 0
    entries: list = redis_client.xrange(keys.telemetry_stream)  # type: ignore[assignment]
    assert len(entries) == 1
    assert load(TelemetrySample, entries[0][1][FIELD.encode()]) == sample


def test_stream_is_capped(
    redis_client: redis.Redis, keys: Keys, key_prefix: str, redis_url: str
) -> None:
    service = make_service(key_prefix, redis_url, stream_maxlen=10)
    for _ in range(350):
        service.tick()
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): bounded, not exact.
    assert 10 <= redis_client.xlen(keys.telemetry_stream) <= 110


def test_run_stops_gracefully(
    redis_client: redis.Redis, keys: Keys, key_prefix: str, redis_url: str
) -> None:
    service = make_service(key_prefix, redis_url, interval_s=0.05)
    thread = threading.Thread(target=service.run)
    thread.start()
    deadline = time.monotonic() + 5.0
    while redis_client.xlen(keys.telemetry_stream) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    service.stop()
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    assert redis_client.xlen(keys.telemetry_stream) >= 3


def test_redis_outage_does_not_stop_the_monitor(key_prefix: str) -> None:
    settings = MonitorSettings(redis_url="redis://127.0.0.1:1/0", key_prefix=key_prefix)
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=0.2)
    service = MonitorService(settings, client, TelemetryReader("t-host"))
    sample = service.reader.read()
    assert service.publish(sample) is False
    assert service.tick().host_memory_total_bytes > 0  # still reads after the failure


def test_samples_reach_the_records(
    redis_client: redis.Redis, key_prefix: str, redis_url: str, tmp_path: Path
) -> None:
    records = open_records(f"sqlite:///{tmp_path / 'aegis.db'}")
    writer = RecordWriter(records, flush_interval_s=0.05)
    try:
        service = make_service(key_prefix, redis_url)
        service.recorder = writer
        samples = [service.tick() for _ in range(3)]
        assert writer.flush(timeout=5.0)
        rows = records.fetch("telemetry")
    finally:
        writer.close()
        records.close()
    assert [row["ts"] for row in rows] == [s.ts for s in samples]
    assert all(row["gpu_index"] is None for row in rows)  # host-only samples
    assert rows[0]["host_memory_total_bytes"] == samples[0].host_memory_total_bytes
