"""Worker events (cycle stats, OOMs) on a capped Redis stream, read by the agent.

Entries carry ``kind`` ("cycle" or "oom") and ``data`` (the model's JSON).
"""

from __future__ import annotations

import redis

from shared.keys import Keys
from shared.schemas import CycleStats, OomEvent, dump, load

KINDS: dict[str, type[CycleStats] | type[OomEvent]] = {"cycle": CycleStats, "oom": OomEvent}


def publish_event(
    client: redis.Redis, keys: Keys, event: CycleStats | OomEvent, maxlen: int
) -> None:
    """Append an event; the stream keeps about ``maxlen`` entries."""
    client.xadd(
        keys.events_stream,
        {"kind": event.type, "data": dump(event)},
        maxlen=maxlen,
        approximate=True,
    )


def parse_event(fields: dict[bytes, bytes]) -> CycleStats | OomEvent | None:
    """Decode a stream entry; ``None`` for an unknown kind."""
    model = KINDS.get(fields.get(b"kind", b"").decode())
    return load(model, fields[b"data"]) if model else None
