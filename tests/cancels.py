"""Cancelling requests as the gateway does, from synchronous tests."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from shared.keys import Keys
from shared.queue import GatewayQueue


def cancel_as_the_gateway(
    redis_url: str, keys: Keys, request_ids: list[str], ttl_s: int = 60
) -> None:
    """Cancel requests through the gateway's own queue (their keys, then the counter)."""

    async def cancel() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await GatewayQueue(client, keys, max_depth=10).request_cancel(request_ids, ttl_s)
        finally:
            await client.aclose()

    asyncio.run(cancel())
