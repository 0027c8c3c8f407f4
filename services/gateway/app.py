"""The gateway's FastAPI application: :func:`create_app` wires settings, routes, handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway.config import GatewaySettings
from services.gateway.errors import install_handlers
from services.gateway.metrics import GatewayMetrics, MetricsMiddleware
from services.gateway.routes import completions, health, jobs, models
from services.gateway.state import GatewayState

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """A gateway app; Redis clients are opened by its lifespan, closed at shutdown."""
    settings = settings or GatewaySettings()
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = GatewayState.open(settings, metrics)
        app.state.gateway = state
        log.info(
            "gateway on %s:%d, redis %s, prefix %r, queue bound %d",
            settings.gateway_host,
            settings.gateway_port,
            settings.redis_url,
            settings.key_prefix,
            settings.max_queue_depth,
        )
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="AEGIS gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    for router in (completions.router, models.router, jobs.router, health.router):
        app.include_router(router)
    return app
