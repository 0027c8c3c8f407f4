"""Run the gateway: ``python -m services.gateway`` (settings from ``AEGIS_*``)."""

from __future__ import annotations

import uvicorn

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.draining import DrainingServer
from shared.logs import setup_logging


def main() -> None:
    settings = GatewaySettings()
    setup_logging(settings.log_level, settings.log_json, service="gateway")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,  # keep the one logging setup
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s + 0.999),
    )
    DrainingServer(config, app.state.shutdown).run()


if __name__ == "__main__":
    main()
