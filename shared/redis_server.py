"""Find a Redis that answers, or start a local ``redis-server`` when none does.

Used by the launcher (``aegis run``) so the embedded defaults work on a machine that
has the Redis binary but no running server.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

log = logging.getLogger(__name__)

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


class RedisUnavailable(RuntimeError):
    """No Redis answers and none could be started; the message names the fix."""


def answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def ensure_redis(
    url: str, data_dir: Path, wait_s: float = 10.0, bundled: Path | None = None
) -> subprocess.Popen[bytes] | None:
    """Return ``None`` if Redis answers at ``url``; else start a local one and return it.

    ``bundled``: a folder holding a ``redis-server`` and the libraries it needs (as carried
    to a machine without one), preferred over the one on PATH.
    Raises :class:`RedisUnavailable` when the URL is remote or no binary is installed.
    """
    if answers(url):
        return None
    parsed = urlparse(url)
    if parsed.hostname not in LOCAL_HOSTS:
        raise RedisUnavailable(
            f"Redis does not answer at {url}; start it there "
            "or point AEGIS_REDIS_URL at a server that runs"
        )
    binary, env = _binary(bundled)
    if binary is None:
        raise RedisUnavailable(
            f"Redis does not answer at {url} and no redis-server binary was found: install it "
            "(e.g. `apt-get install redis-server`) or set AEGIS_REDIS_URL to a running server"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    port = parsed.port or 6379
    cmd = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir.resolve()),
    ]
    log.warning("Redis does not answer at %s: starting a local redis-server on port %d", url, port)
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if answers(url, timeout_s=0.5):
            return process
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RedisUnavailable(f"started {binary} on port {port} but it did not answer at {url}")


def _binary(bundled: Path | None) -> tuple[str | None, dict[str, str] | None]:
    """The redis-server to run, and the environment it needs (None: this one)."""
    if bundled is not None and (bundled / "redis-server").exists():
        libraries = os.pathsep.join(filter(None, [str(bundled), os.environ.get("LD_LIBRARY_PATH")]))
        return str(bundled / "redis-server"), {**os.environ, "LD_LIBRARY_PATH": libraries}
    return shutil.which("redis-server"), None
