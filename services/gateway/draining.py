"""Graceful stop: in-flight requests are answered, never cut off by the server's timeout.

On SIGTERM uvicorn stops accepting connections and waits up to ``shutdown_grace_s``
for the open ones, then cancels them (a client would get a plain-text 500).
:class:`DrainingServer` tells :class:`Shutdown` when the stop begins; every request
still waiting ``drain_s`` later is answered with a 503 in OpenAI's shape (or an error
event on a stream), before the server's deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class Shutdown:
    """When the gateway began to stop, and when waiting requests must give up."""

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self._begun = asyncio.Event()

    @property
    def stopping(self) -> bool:
        return self._begun.is_set()

    def begin(self) -> None:
        """Called on the event loop when the server starts its shutdown."""
        if not self._begun.is_set():
            log.info("stopping: requests still waiting in %.1fs get a 503", self.drain_s)
            self._begun.set()

    async def drained(self) -> None:
        """Returns ``drain_s`` after the stop began (never, while the gateway runs)."""
        await self._begun.wait()
        await asyncio.sleep(self.drain_s)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that starts the app's drain as its own shutdown begins.

    ``started``, if given, is called once the app has started and the server listens.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        shutdown: Shutdown,
        started: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.drain = shutdown
        self.started_hook = started

    async def startup(self, *args: Any, **kwargs: Any) -> None:
        await super().startup(*args, **kwargs)
        if self.started_hook is not None and not self.should_exit:
            self.started_hook()

    async def shutdown(self, *args: Any, **kwargs: Any) -> None:
        self.drain.begin()
        await super().shutdown(*args, **kwargs)
