"""Graceful stop for the long-running loops of the monitor and the agent."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class Stoppable:
    """A loop that ends after its current turn once :meth:`stop` is called."""

    def __init__(self) -> None:
        self.stopping = threading.Event()

    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """End the loop after the current turn (usable as a signal handler)."""
        if signum is not None:
            log.info("signal %d received; stopping", signum)
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        """Stop gracefully on SIGTERM and SIGINT (main thread only)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
