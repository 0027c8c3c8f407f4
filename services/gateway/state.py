"""What the gateway holds while it runs, created by the app's lifespan."""

from __future__ import annotations

import asyncio
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


def connection_kwargs() -> dict[str, Any]:
    """Keyword arguments that make a new gateway Redis connection cheap to open.

    Every waiting request holds a connection in its blocking read, so a burst of new
    requests opens a connection each. redis-py 8 would then send ``HELLO 3`` and two
    ``CLIENT SETINFO`` (two round trips before the first command), and read its own
    version from the package metadata for each connection (parsing METADATA: some 30 %
    of the gateway's CPU in a burst of 512). RESP2 (redis-py's default before
    8; :func:`shared.queue._entries` reads both) and no ``SETINFO`` (a label in
    ``CLIENT LIST`` only) make a new connection a TCP connect and nothing more.
    """
    try:
        from redis.driver_info import DriverInfo  # noqa: F401  (where driver_info exists)
    except ImportError:
        return {"protocol": 2, "lib_name": None, "lib_version": None}
    return {"protocol": 2, "driver_info": None}


# How long a stopping app waits for the model watcher to end (it is cancelled first).
WATCHER_STOP_S = 2.0


@dataclass
class GatewayState:
    """Clients and caches shared by every request of one app."""

    settings: GatewaySettings
    keys: Keys
    client: aioredis.Redis
    # RQ speaks sync redis-py only.
    sync_client: redis.Redis
    queue: GatewayQueue
    catalog: ModelCatalog
    generator: Generator
    jobs: Queue
    database: DatabaseCheck
    metrics: GatewayMetrics
    watcher: asyncio.Task[None] | None = None

    @classmethod
    def open(
        cls, settings: GatewaySettings, metrics: GatewayMetrics, shutdown: Shutdown
    ) -> GatewayState:
        keys = Keys(settings.key_prefix)
        # Every waiting request holds a connection in a blocking XREAD: size the pool for a
        # full queue, and make a request beyond it wait for a connection, not fail.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.max_queue_depth + 64,
            timeout=None,
            **connection_kwargs(),
        )
        client = aioredis.Redis(connection_pool=pool)
        sync_client = redis.Redis.from_url(settings.redis_url)
        queue = GatewayQueue(client, keys, settings.max_queue_depth)
        return cls(
            settings=settings,
            keys=keys,
            client=client,
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
        """Background work of a running app: the model is loaded before any request."""
        self.watcher = asyncio.get_running_loop().create_task(self.catalog.watch())

    async def close(self) -> None:
        if self.watcher is not None:
            self.catalog.stop_watching()
            self.watcher.cancel()
            await asyncio.wait({self.watcher}, timeout=WATCHER_STOP_S)
        await self.generator.settle()
        await self.client.aclose(close_connection_pool=True)
        self.sync_client.close()
        self.database.close()
