"""Dead letters for the dashboard, read from Redis (read-only: XREVRANGE and GET only).

Requests that failed too many deliveries are kept by the workers in a capped Redis
stream (``Keys.dead_letters``) with their error text, and counted for ever in
``Keys.dead_letter_count``; the records database holds neither, so this is the one
place the dashboard reads Redis. The client uses short timeouts so that a Redis outage
costs a refresh well under a second; :class:`redis.RedisError` then reaches the app,
which says so instead of drawing the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import redis
from pydantic import ValidationError

from shared.keys import Keys
from shared.queue import FIELD
from shared.replies import as_text
from shared.schemas import DeadLetter, load

COLUMNS = ["time", "request", "worker", "model", "deliveries", "error", "prompt tokens", "prompt"]


@dataclass(frozen=True)
class DeadLetters:
    """The dead letters of a window, newest first, and the all-time count."""

    letters: list[DeadLetter] = field(default_factory=list)
    total: int = 0


def client_for(url: str, timeout_s: float) -> redis.Redis:
    """A Redis client that gives up after ``timeout_s`` (connecting or reading)."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def read_dead_letters(
    client: redis.Redis, keys: Keys, since: float | None, limit: int
) -> DeadLetters:
    """The latest ``limit`` dead letters written at or after ``since`` (epoch s), newest first.

    Stream ids are the millisecond of the XADD, so the window bound is the id range.
    An entry that does not parse is skipped (a newer writer's format, say). Raises
    :class:`redis.RedisError` when Redis can't be read.
    """
    oldest = "-" if since is None else str(int(since * 1000))
    entries: Any = client.xrevrange(keys.dead_letters, max="+", min=oldest, count=limit)
    count: Any = client.get(keys.dead_letter_count)
    letters = []
    for _, fields in entries or []:
        try:
            letters.append(load(DeadLetter, fields[FIELD.encode()]))
        except (KeyError, ValueError, ValidationError):
            continue
    return DeadLetters(letters, int(as_text(count)) if count else 0)


def dead_letters_table(letters: list[DeadLetter], workers: tuple[str, ...] = ()) -> pd.DataFrame:
    """The letters (of ``workers``; none = all) as table rows, in the order given."""
    rows = [
        {
            "time": pd.Timestamp(letter.ts, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC"),
            "request": letter.request_id,
            "worker": letter.worker_id,
            "model": letter.model,
            "deliveries": letter.deliveries,
            "error": letter.error,
            "prompt tokens": letter.prompt_tokens,
            "prompt": letter.prompt_preview,
        }
        for letter in letters
        if not workers or letter.worker_id in workers
    ]
    return pd.DataFrame(rows, columns=COLUMNS)
