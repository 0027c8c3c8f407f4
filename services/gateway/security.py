"""The edge of the gateway: API keys and the request body size limit (pure ASGI).

Both answer before any route runs (so before the body is parsed), in OpenAI's error
shape: 401 ``invalid_api_key`` and 413 ``request_too_large``.

- :class:`ApiKeyAuth`: with ``AEGIS_API_KEYS`` set, ``/v1/*`` needs
  ``Authorization: Bearer <key>``; the operations endpoints (``/health``, ``/ready``,
  ``/metrics``) too when ``AEGIS_AUTH_OPERATIONS`` is true. Keys are compared in
  constant time, against every configured key, so timing tells nothing about them.
- :class:`BodyLimit`: a declared ``Content-Length`` over the limit is refused at once; a
  body without one is read up to the limit and replayed to the app.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import ApiError, error_response

OPERATIONS_PATHS = frozenset({"/health", "/ready", "/metrics"})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


def bearer_token(scope: Scope) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuth:
    """401 for a request to a protected path without one of the configured keys."""

    def __init__(self, app: ASGIApp, keys: list[str], protect_operations: bool = False) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.protect_operations = protect_operations

    def protects(self, path: str) -> bool:
        if not self.keys:
            return False
        if path == "/v1" or path.startswith("/v1/"):
            return True
        return self.protect_operations and path in OPERATIONS_PATHS

    def accepts(self, token: bytes | None) -> bool:
        if token is None:
            return False
        # Every key is compared (no early exit), each in constant time.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protected = scope["type"] == "http" and self.protects(scope["path"])
        if protected and not self.accepts(bearer_token(scope)):
            error = ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>' "
                "with one of the keys in AEGIS_API_KEYS",
                "invalid_request_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is larger than {limit} bytes (AEGIS_MAX_BODY_BYTES)",
        "invalid_request_error",
        code="request_too_large",
    )


class BodyLimit:
    """413 for a body over ``limit`` bytes, decided before the app reads any of it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                bad = ApiError(400, "invalid Content-Length header", code="invalid_header")
                await error_response(bad)(scope, receive, send)
            elif int(declared) > self.limit:
                await error_response(_too_large(self.limit))(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        body = await self._read_within_limit(receive)
        if body is None:
            await error_response(_too_large(self.limit))(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_within_limit(self, receive: Receive) -> list[Message] | None:
        """The body's messages (chunked, no length declared), or None past the limit."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.limit:
                return None
            if not message.get("more_body", False):
                return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
