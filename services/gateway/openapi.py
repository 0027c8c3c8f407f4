"""What the OpenAPI document says about errors: the statuses the gateway really answers.

FastAPI documents a 422 for every route with parameters; the gateway answers 400 (as
OpenAI does), so the 422s are replaced by the declared OpenAI-shaped errors.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.gateway.schemas import ErrorResponse

_MEANING = {
    400: "Invalid request (OpenAI error shape; `param` names the field)",
    401: "Missing or wrong API key (when AEGIS_API_KEYS is set)",
    404: "No such model or resource",
    409: "The first run of this Idempotency-Key was cancelled before it finished",
    413: "Request body over AEGIS_MAX_BODY_BYTES",
    429: "Queue full: retry after the Retry-After header's seconds",
    500: "A worker failed to generate the answer",
    503: "Redis, the model or the gateway itself (shutting down) is unavailable",
    504: "No answer from a worker within AEGIS_REQUEST_TIMEOUT_S",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: the listed statuses, each an OpenAI-shaped error."""
    return {
        status: {"model": ErrorResponse, "description": _MEANING[status]} for status in statuses
    }


# Every /v1 route can answer these (the edge middlewares and the Redis handler).
EDGE = (400, 401, 413, 503)
GENERATION = errors(*EDGE, 404, 409, 429, 500, 504)


def install_openapi(app: FastAPI) -> None:
    """Serve an OpenAPI document without FastAPI's 422s."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes,
                description=app.description,
            )  # fmt: skip
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
