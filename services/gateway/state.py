"""What the gateway holds while it runs, created by the app's lifespan."""

from __future__ import annotations

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
    """Keyword arguments for the gateway's Redis connections.

    redis-py 7+ builds a ``DriverInfo`` for every new connection and reads the package's
    version from its installed metadata each time (parsing the METADATA file): a third
    of the gateway's CPU during a burst of new requests, each opening a connection for
    its blocking read. One built here is shared by every connection (the same
    ``CLIENT SETINFO`` is sent); older redis-py reads the version once at import.
    """
    try:
        from redis.driver_info import DriverInfo
    except ImportError:
        return {}
    return {"driver_info": DriverInfo(name="redis-py", lib_version=redis.__version__)}


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

    async def close(self) -> None:
        await self.generator.settle()
        await self.client.aclose(close_connection_pool=True)
        self.sync_client.close()
        self.database.close()
