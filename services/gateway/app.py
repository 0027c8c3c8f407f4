"""The gateway's FastAPI application: :func:`create_app` wires settings, routes, handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway.config import GatewaySettings
from services.gateway.draining import Shutdown
from services.gateway.errors import install_handlers
from services.gateway.metrics import GatewayMetrics, MetricsMiddleware
from services.gateway.openapi import install_openapi
from services.gateway.routes import completions, dead_letters, health, jobs, models
from services.gateway.security import ApiKeyAuth, BodyLimit
from services.gateway.state import GatewayState

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """A gateway app; Redis clients are opened by its lifespan, closed at shutdown.

    Run it with :class:`services.gateway.draining.DrainingServer` and
    ``app.state.shutdown`` so that a stop answers the requests still waiting.
    """
    settings = settings or GatewaySettings()
    metrics = GatewayMetrics()
    shutdown = Shutdown(settings.drain_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = GatewayState.open(settings, metrics, shutdown)
        app.state.gateway = state
        state.start()
        metrics.processes.set(1)
        log.info(
            "gateway on %s:%d, redis %s, prefix %r, queue bound %d, API keys %s",
            settings.gateway_host,
            settings.gateway_port,
            settings.redis_url,
            settings.key_prefix,
            settings.max_queue_depth,
            f"on ({len(settings.api_keys)})" if settings.api_keys else "off",
        )
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="AEGIS gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.shutdown = shutdown
    install_handlers(app)
    # The last added runs first: metrics see every answer, auth runs before the body
    # is read, the size limit before it is parsed.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    keys = [key.get_secret_value() for key in settings.api_keys]
    app.add_middleware(ApiKeyAuth, keys=keys, protect_operations=settings.auth_operations)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    routers = (completions.router, models.router, jobs.router, dead_letters.router, health.router)
    for router in routers:
        app.include_router(router)
    install_openapi(app)
    return app
