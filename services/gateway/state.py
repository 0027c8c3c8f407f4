"""What the gateway holds while it runs, created by the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from rq import Queue

from services.gateway.catalog import ModelCatalog
from services.gateway.config import GatewaySettings
from services.gateway.draining import Shutdown
from services.gateway.generation import Generator
from services.gateway.metrics import GatewayMetrics
from services.gateway.readiness import DatabaseCheck
from shared.keys import Keys
from shared.queue import GatewayQueue

log = logging.getLogger(__name__)


def connection_kwargs() -> dict[str, Any]:
    """Keyword arguments that make a new gateway Redis connection cheap to open.

    redis-py 8 would send ``HELLO 3`` and two ``CLIENT SETINFO`` (two round trips before
    the first command), and read its own version from the package metadata for each
    connection (parsing METADATA: some 30 % of the gateway's CPU in a burst of 512 when
    every waiting request opened a connection of its own). RESP2 (redis-py's default
    before 8; :func:`shared.queue._entries` and :func:`shared.feed.stream_entries` read
    both) and no ``SETINFO`` (a label in ``CLIENT LIST`` only) make a new connection a
    TCP connect and nothing more.
    """
    try:
        from redis.driver_info import DriverInfo  # noqa: F401  (where driver_info exists)
    except ImportError:
        return {"protocol": 2, "lib_name": None, "lib_version": None}
    return {"protocol": 2, "driver_info": None}


def open_clients(settings: GatewaySettings) -> tuple[aioredis.Redis, aioredis.Redis]:
    """The client commands go through, and the one the answers are read with.

    Commands share a bounded pool: a burst of requests waits its turn for a connection
    instead of opening one each (a connect and its address lookup cost as much as the
    command). Reads of the answers block, one connection per reader of
    :class:`shared.feed.ResultFeed`, so they get a pool of their own that commands can
    never exhaust.
    """
    commands = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.gateway_redis_connections,
        timeout=None,
        **connection_kwargs(),
    )
    reads = aioredis.ConnectionPool.from_url(settings.redis_url, **connection_kwargs())
    return aioredis.Redis(connection_pool=commands), aioredis.Redis(connection_pool=reads)


# How long a stopping app waits for the model watcher to end (it is cancelled first).
WATCHER_STOP_S = 2.0


@dataclass
class GatewayState:
    """Clients and caches shared by every request of one app."""

    settings: GatewaySettings
    keys: Keys
    client: aioredis.Redis
    reads: aioredis.Redis
    # RQ speaks sync redis-py only.
    sync_client: redis.Redis
    queue: GatewayQueue
    catalog: ModelCatalog
    generator: Generator
    jobs: Queue
    database: DatabaseCheck
    metrics: GatewayMetrics
    watcher: asyncio.Task[None] | None = None
    opener: asyncio.Task[None] | None = None

    @classmethod
    def open(
        cls, settings: GatewaySettings, metrics: GatewayMetrics, shutdown: Shutdown
    ) -> GatewayState:
        keys = Keys(settings.key_prefix)
        client, reads = open_clients(settings)
        sync_client = redis.Redis.from_url(settings.redis_url)
        queue = GatewayQueue(client, keys, settings.max_queue_depth, reads=reads)
        return cls(
            settings=settings,
            keys=keys,
            client=client,
            reads=reads,
            sync_client=sync_client,
            queue=queue,
            catalog=ModelCatalog(client, keys, settings.model_refresh_s),
            generator=Generator(
                queue,
                metrics,
                settings.request_timeout_s,
                settings.retry_after_s,
                shutdown,
                settings.idempotency_ttl_s,
            ),
            jobs=Queue(keys.rq_queue, connection=sync_client),
            database=DatabaseCheck(settings.resolved_database_url()),
            metrics=metrics,
        )

    def start(self) -> None:
        """Background work of a running app: the model is loaded before any request, and
        the command connections are opened before the first burst needs them."""
        loop = asyncio.get_running_loop()
        self.watcher = loop.create_task(self.catalog.watch())
        self.opener = loop.create_task(self._open_connections())

    async def _open_connections(self) -> None:
        # Commands in flight at once each hold a connection: the pool opens them all.
        count = self.settings.gateway_redis_connections
        try:
            await asyncio.gather(*(self.client.ping() for _ in range(count)))
        except redis.RedisError as exc:  # opened on demand instead; /ready reports Redis
            log.info("could not open Redis connections ahead: %s", exc)

    async def close(self) -> None:
        if self.watcher is not None:
            self.catalog.stop_watching()
            self.watcher.cancel()
            await asyncio.wait({self.watcher}, timeout=WATCHER_STOP_S)
        if self.opener is not None:
            self.opener.cancel()
            await asyncio.gather(self.opener, return_exceptions=True)
        await self.generator.settle()
        await self.client.aclose(close_connection_pool=True)
        await self.reads.aclose(close_connection_pool=True)
        self.sync_client.close()
        self.database.close()
