"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib
from dataclasses import asdict

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from services.gateway.deps import StateDep
from services.gateway.readiness import readiness

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Whether the process is alive (always 200 while it answers)."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(state: StateDep) -> JSONResponse:
    """Whether Redis, the database and a published model are all there (else 503)."""
    checks = await readiness(state.client, state.database, state.catalog)
    failed = [name for name, check in checks.items() if not check.ok]
    body = {
        "status": "not ready" if failed else "ready",
        "failed": failed,
        "checks": {name: asdict(check) for name, check in checks.items()},
    }
    return JSONResponse(body, status_code=503 if failed else 200)


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics of this gateway."""
    # A Redis outage must not hide the other metrics.
    with contextlib.suppress(Exception):
        state.metrics.queue_depth.set(await state.queue.depth())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
