"""One loop around the engine core, driven by the worker service and the benchmark runner.

Each iteration: apply changed settings (between steps, never mid-step) -> take in as many
new requests as the core can admit (blocking only when it is idle) -> abort cancelled
ones -> run one step -> deliver new text and finished answers -> count the step into the
window, and record the window when it is due. The I/O (:class:`LoopIO`) is the only
part that differs: Redis streams in the worker, in-memory lists in the benchmark.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from services.worker.core.engine import CoreStats, StepOutput
from services.worker.core.scheduler import Limits
from services.worker.precision import PrecisionUnavailable
from services.worker.window import StepWindow
from shared.schemas import ControlSettings, GenerationRequest, Precision

log = logging.getLogger(__name__)

# After a step that ran nothing (every unfinished request waits on a limit: a pool the
# agent has yet to grow, a length cap), the loop waits this long before the next step:
# what it waits for is a new setting, a cancel, a timeout or a new request, and without
# the wait it spun at ~9,000 empty steps a second (a second worker on an H200, whose
# CPU core the other worker's loop needed).
STALLED_WAIT_S = 0.02


class ServingCore(Protocol):
    """What the loop needs of an engine: the paged core (:class:`~services.worker.core.
    engine.EngineCore`) or the batch fallback (:class:`~services.worker.batch_core.
    BatchEngineCore`)."""

    limits: Limits

    @property
    def has_work(self) -> bool: ...

    @property
    def precision(self) -> Precision: ...

    def free_slots(self) -> int: ...

    def add(self, request: GenerationRequest) -> None: ...

    def abort(self, request_id: str) -> bool: ...

    def step(self) -> StepOutput: ...

    def apply(self, settings: ControlSettings) -> list[str]: ...

    def stats(self) -> CoreStats: ...

    def unfinished_ids(self) -> Sequence[str]: ...

    def take_unstarted(self) -> list[str]: ...

    def take_precision_saved(self) -> int | None: ...

    def warm_up(self) -> int: ...


class LoopIO(Protocol):
    """Where requests, settings and cancellations come from and where answers go."""

    def current_settings(self) -> ControlSettings:
        """The settings in force now (the agent's, or the initial ones)."""
        ...

    def pull(self, count: int, block: bool) -> list[GenerationRequest]:
        """Up to ``count`` new requests; wait a while for some only when ``block``."""
        ...

    def cancelled(self, request_ids: list[str]) -> set[str]:
        """Which of these running requests their clients gave up on."""
        ...

    def deliver(self, output: StepOutput) -> None:
        """Publish a step's new text and its finished answers."""
        ...

    def record(self, window: StepWindow, loop: ServingLoop) -> None:
        """Record a window of steps (its record is ``window.flush(...)``)."""
        ...


class ServingLoop:
    """The core plus its I/O; :meth:`iterate` is one step of the serving loop."""

    def __init__(
        self,
        core: ServingCore,
        io: LoopIO,
        record_interval_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.core = core
        self.io = io
        self._sleep = sleep
        self.window = StepWindow(interval_s=record_interval_s)
        self.applied = ControlSettings(version=-1)
        self.requests: dict[str, GenerationRequest] = {}
        self.precision_saved_bytes: int | None = None

    def prepare(self) -> int:
        """Apply the settings in force and capture the decode graphs they need, before
        serving: a pool resized by them (an agent's budget kept across a restart, a
        benchmark's static configuration) would otherwise drop its graphs in the first
        step and re-capture them while requests wait. Returns the graphs captured."""
        self._apply(self.io.current_settings())
        return self.core.warm_up()

    def iterate(self, accept: bool = True) -> StepOutput | None:
        """One iteration; None when there was nothing to run. ``accept=False`` drains."""
        self._apply(self.io.current_settings())
        if accept:
            self._take_in()
        self._cancel()
        if not self.core.has_work:
            self._record_if_due()
            return None
        out = self.core.step()
        # Counted before it is delivered: a delivery that fails (Redis) is retried by the
        # I/O, and the step must be in the window once either way.
        self.window.add(out, self.requests)
        for outcome in out.finished:
            self.requests.pop(outcome.request_id, None)
        self.io.deliver(out)
        self._record_if_due()
        if _ran_nothing(out):
            self._sleep(STALLED_WAIT_S)
        return out

    def _take_in(self) -> None:
        room = self.core.free_slots()
        if room <= 0:
            return
        for request in self.io.pull(room, block=not self.core.has_work):
            self.requests[request.id] = request
            self.core.add(request)

    def _cancel(self) -> None:
        ids = list(self.core.unfinished_ids())
        if ids:
            for request_id in self.io.cancelled(ids):
                if self.core.abort(request_id):
                    log.info("request %s cancelled", request_id)

    def _apply(self, settings: ControlSettings) -> None:
        if settings.version == self.applied.version:
            return
        try:
            changes = self.core.apply(settings)
        except PrecisionUnavailable as exc:
            log.error("settings ask for %s, which is unavailable (%s): staying at %s",
                      settings.precision, exc, self.core.precision)  # fmt: skip
            settings = settings.model_copy(update={"precision": self.core.precision})
            changes = self.core.apply(settings)
        self.applied = settings.model_copy(
            update={"max_seq_len": self.core.limits.max_seq_len, "precision": self.core.precision}
        )
        log.info("settings v%d applied (%s): %s", settings.version, settings.reason,
                 "; ".join(changes) or "no change to the engine")  # fmt: skip

    def _record_if_due(self) -> None:
        if self.window.due():
            self.io.record(self.window, self)

    def flush(self) -> None:
        """Record what the window holds now (at the end of a run)."""
        if self.window.steps:
            self.io.record(self.window, self)


def _ran_nothing(out: StepOutput) -> bool:
    """A step that computed no token and ended no request."""
    stats = out.stats
    return not (stats.prefill_tokens or stats.decode_tokens or out.finished or stats.oom)
