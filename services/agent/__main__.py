"""``python -m services.agent``: decide every worker's settings until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import redis

from services.agent.config import AgentSettings
from services.agent.service import AgentService
from shared.db import RecordWriter
from shared.logs import setup_logging

log = logging.getLogger("services.agent")


def main() -> None:
    """Run the agent with settings from the environment."""
    settings = AgentSettings()
    setup_logging(settings.log_level, settings.log_json, service="agent")
    client = redis.Redis.from_url(settings.redis_url)
    # A URL, not an open store: a database that is down at start-up only delays records.
    writer = RecordWriter(
        settings.resolved_database_url(), spill_dir=settings.data_dir / "spill" / "agent"
    )
    service = AgentService(settings, client, writer)
    service.install_signal_handlers()
    try:
        service.run()
    finally:
        writer.close()
        client.close()


if __name__ == "__main__":
    main()
