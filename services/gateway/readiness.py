"""The checks behind ``GET /ready``: able to serve = Redis answers, a worker's heartbeat
is live and its model is published. The database is reported beside them: records
are buffered while it is down, and inference goes on, so it does not make the gateway
unready."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.gateway.catalog import ModelCatalog
from shared.keys import Keys
from shared.replies import as_text

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0


@dataclass
class Check:
    ok: bool
    detail: str


class DatabaseCheck:
    """Pings the records database, keeping one connection open between checks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._records: Any = None
        self._lock = threading.Lock()

    def ping(self) -> Check:
        """Whether the database answers (blocking: call it in a thread)."""
        with self._lock:
            try:
                # Imported here: the database layer is optional for the request path.
                from shared.db import open_records
            except ImportError as exc:
                return Check(False, f"database layer unavailable: {exc}")
            try:
                if self._records is None:
                    self._records = open_records(self.url)
                if self._records.ping():
                    return Check(True, "ok")
                detail = "database did not answer"
            except Exception as exc:
                detail = f"database error: {exc}"
            self._close()
            return Check(False, detail)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        records, self._records = self._records, None
        if records is not None:
            try:
                records.close()
            except Exception as exc:
                log.debug("closing the records failed: %s", exc)


async def _redis(client: aioredis.Redis) -> Check:
    try:
        await asyncio.wait_for(client.ping(), CHECK_TIMEOUT_S)
    except Exception as exc:
        return Check(False, f"redis error: {exc or type(exc).__name__}")
    return Check(True, "ok")


async def _database(check: DatabaseCheck) -> Check:
    try:
        return await asyncio.wait_for(asyncio.to_thread(check.ping), CHECK_TIMEOUT_S)
    except TimeoutError:
        return Check(False, f"database did not answer within {CHECK_TIMEOUT_S:.0f}s")


async def _model(catalog: ModelCatalog) -> Check:
    try:
        model = await catalog.current()
    except Exception as exc:
        return Check(False, f"could not read the model info: {exc}")
    if model is None:
        reason = catalog.last_error or "no worker has loaded a model yet"
        return Check(False, reason)
    return Check(True, model.served_name)


async def _workers(client: aioredis.Redis, keys: Keys) -> Check:
    """A registered worker whose heartbeat key (with its TTL) is still there."""
    try:
        worker_ids = [as_text(w) for w in await client.hkeys(keys.workers)]
        alive = (
            await client.exists(*[keys.worker_alive(w) for w in worker_ids]) if worker_ids else 0
        )
    except Exception as exc:
        return Check(False, f"could not read the workers: {exc}")
    if not alive:
        return Check(False, f"no live worker heartbeat ({len(worker_ids)} registered)")
    return Check(True, f"{alive} of {len(worker_ids)} registered worker(s) alive")


# Checks that must pass to serve; the others are reported only.
REQUIRED = ("redis", "workers", "model")


async def readiness(
    client: aioredis.Redis, keys: Keys, database: DatabaseCheck, catalog: ModelCatalog
) -> dict[str, Check]:
    """Every check, run concurrently (those needing Redis only when it answers)."""
    redis_check, db_check = await asyncio.gather(_redis(client), _database(database))
    down = Check(False, "redis is down")
    model_check, workers_check = (
        await asyncio.gather(_model(catalog), _workers(client, keys))
        if redis_check.ok
        else (down, down)
    )
    return {
        "redis": redis_check, "workers": workers_check, "model": model_check,
        "database": db_check,
    }  # fmt: skip
