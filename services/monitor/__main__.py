"""``python -m services.monitor``: publish GPU (or host) telemetry until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import redis

from services.monitor.config import MonitorSettings
from services.monitor.nvml import TelemetryReader
from services.monitor.service import MonitorService
from shared.db import RecordWriter
from shared.logs import setup_logging

log = logging.getLogger("services.monitor")


def main() -> None:
    """Run the monitor with settings from the environment."""
    settings = MonitorSettings()
    setup_logging(settings.log_level, settings.log_json, service="monitor")
    client = redis.Redis.from_url(settings.redis_url)
    reader = TelemetryReader(settings.host_name)
    # A URL, not an open store: a database that is down at start-up only delays records.
    # The monitor writes the bulk of the rows (telemetry), so it also prunes old ones.
    writer = RecordWriter(
        settings.resolved_database_url(),
        spill_dir=settings.data_dir / "spill" / "monitor",
        retention_hours=settings.retention_hours,
    )
    service = MonitorService(settings, client, reader, writer)
    service.install_signal_handlers()
    try:
        service.run()
    finally:
        writer.close()
        reader.close()
        client.close()


if __name__ == "__main__":
    main()
