"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Routes raise :class:`ApiError`; the handlers installed by :func:`install_handlers` turn it,
FastAPI's validation errors (400, as OpenAI answers), Redis being down (503) and anything
unexpected (500) into that shape, so a client never sees another format.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than success, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response (also sent as an SSE event)."""
        return error_body(self.message, self.type, self.param, self.code)


def _printable(text: str | None) -> str | None:
    """Text safe to send as UTF-8 JSON: a lone surrogate from the input shows as ``\\ud800``."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": _printable(message),
            "type": type_,
            "param": _printable(param),
            "code": code,
        }
    }


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def no_model() -> ApiError:
    return ApiError(
        503,
        "no worker has loaded a model yet: start a worker and retry",
        "service_unavailable",
        code="model_not_loaded",
    )


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _where(loc: list[Any]) -> str:
    """``messages[0].content`` from pydantic's location, without union member tags."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part not in _TYPE_TAGS and "[" not in str(part):
            text += f".{part}" if text else str(part)
    return text


def _describe(error: dict[str, Any]) -> tuple[str, str | None]:
    """One readable line and the offending parameter of a pydantic error."""
    loc = list(error.get("loc", ()))
    if loc and loc[0] in ("body", "header", "query", "path"):
        loc = loc[1:]
    if error.get("type") == "json_invalid":
        return f"request body is not valid JSON: {error.get('msg', '')}", None
    where = _where(loc)
    if not where:
        return f"request body: {error.get('msg', 'invalid')}", None
    return f"{where}: {error.get('msg', 'invalid')}", str(loc[0])


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    messages = [_describe(error) for error in errors[:6]]
    text = "; ".join(dict.fromkeys(message for message, _ in messages)) or "invalid request"
    param = messages[0][1] if messages else None
    return JSONResponse(error_body(text, "invalid_request_error", param), status_code=400)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    body = error_body(str(exc.detail), type_)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("redis error: %s", exc)
    # The request may have been queued before the connection failed: a retry with the
    # same Idempotency-Key is answered from that run instead of running it again.
    body = error_body(
        f"the queue (Redis) is unavailable: {exc}; retry later, with the same "
        "Idempotency-Key if you sent one",
        "service_unavailable",
        code="queue_unavailable",
    )
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error: %s", exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def install_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` answer in OpenAI's shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_down)
    app.add_exception_handler(Exception, _unexpected)
