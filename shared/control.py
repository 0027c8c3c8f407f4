"""Control settings as state: a versioned hash per worker plus a pub/sub notification.

The agent writes (:meth:`ControlStore.write`), the worker reads at every batch boundary
(:meth:`ControlStore.read`): a missed notification loses nothing, since the hash is the
truth and the version says whether anything changed.
"""

from __future__ import annotations

import redis

from shared.keys import Keys
from shared.schemas import ControlSettings, dump, load

FIELD = "settings"


class ControlStore:
    """Read and write the control settings of workers."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def read(self, worker_id: str) -> ControlSettings | None:
        """The worker's current settings, or ``None`` when the agent never wrote any."""
        raw = self.client.hget(self.keys.control(worker_id), FIELD)
        return load(ControlSettings, raw) if raw else None

    def write(self, worker_id: str, settings: ControlSettings) -> ControlSettings:
        """Store settings under the next version number and notify; returns what was stored."""
        key = self.keys.control(worker_id)
        version = int(self.client.hincrby(key, "version", 1))
        stored = settings.model_copy(update={"version": version})
        self.client.hset(key, FIELD, dump(stored))
        self.client.publish(self.keys.control_channel, worker_id)
        return stored

    def initialise(self, worker_id: str, defaults: ControlSettings) -> ControlSettings:
        """The worker's settings, writing ``defaults`` first when there are none."""
        return self.read(worker_id) or self.write(worker_id, defaults)
