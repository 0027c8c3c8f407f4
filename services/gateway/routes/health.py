"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib
from dataclasses import asdict

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from services.gateway.deps import StateDep
from services.gateway.openapi import errors
from services.gateway.readiness import REQUIRED, readiness

router = APIRouter(tags=["operations"])


@router.get("/health", responses=errors(401))
async def health() -> dict[str, str]:
    """Whether the process is alive (always 200 while it answers)."""
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=None,
    responses={503: {"description": "Not able to serve: `failed` lists why"}, **errors(401)},
)
async def ready(state: StateDep) -> JSONResponse:
    """Able to serve: Redis, a live worker and its model (else 503); database reported."""
    checks = await readiness(state.client, state.keys, state.database, state.catalog)
    failed = [name for name in REQUIRED if not checks[name].ok]
    body = {
        "status": "not ready" if failed else "ready",
        "failed": failed,
        "degraded": [
            name for name, check in checks.items() if name not in REQUIRED and not check.ok
        ],
        "checks": {name: asdict(check) for name, check in checks.items()},
    }
    return JSONResponse(body, status_code=503 if failed else 200)


@router.get(
    "/metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(401)},
)
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics of this gateway (and the dead-letter count of all workers)."""
    # A Redis outage must not hide the other metrics.
    with contextlib.suppress(Exception):
        state.metrics.queue_depth.set(await state.queue.depth())
        state.metrics.dead_letters.set(
            int(await state.client.get(state.keys.dead_letter_count) or 0)
        )
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
