"""The serving loop around the engine core on CPU: it waits, instead of spinning, while
every unfinished request waits on a limit, and runs again once a setting lifts it."""

from __future__ import annotations

from services.worker.core.engine import EngineCore
from services.worker.loop import STALLED_WAIT_S, ServingLoop
from services.worker.model import LoadedModel
from services.worker.window import StepWindow
from shared.schemas import ControlSettings, GenerationRequest
from tests.worker.core.test_engine import config


class ListIO:
    """The loop's I/O as lists: requests to hand out, answers delivered."""

    def __init__(self, settings: ControlSettings, requests: list[GenerationRequest]) -> None:
        self.settings = settings
        self.incoming = list(requests)
        self.answered: list[str] = []

    def current_settings(self) -> ControlSettings:
        return self.settings

    def pull(self, count: int, block: bool) -> list[GenerationRequest]:
        taken, self.incoming = self.incoming[:count], self.incoming[count:]
        return taken

    def cancelled(self, request_ids: list[str]) -> set[str]:
        return set()

    def deliver(self, output: object) -> None:
        self.answered += [o.request_id for o in output.finished]  # type: ignore[attr-defined]

    def record(self, window: StepWindow, loop: ServingLoop) -> None:
        window.flush()


def test_the_loop_waits_while_every_request_waits_on_a_limit(tiny: LoadedModel) -> None:
    short = GenerationRequest(id="short", prompt="p", prompt_token_ids=[1, 5, 6])
    long = GenerationRequest(id="long", prompt="p", prompt_token_ids=[1] + [7] * 40)
    capped = ControlSettings(version=1, batch_size=6, max_seq_len=32, precision="fp32")
    io = ListIO(capped, [short, long])
    sleeps: list[float] = []
    loop = ServingLoop(EngineCore(tiny, config()), io, sleep=sleeps.append)
    while "short" not in io.answered:
        loop.iterate()
    assert sleeps == []  # every step so far ran tokens: no wait
    out = loop.iterate()  # only the long one is left, and its prompt is over the cap
    assert out is not None and not out.finished
    assert sleeps == [STALLED_WAIT_S]
    io.settings = capped.model_copy(update={"version": 2, "max_seq_len": 512})
    while "long" not in io.answered:
        loop.iterate()
    assert sleeps == [STALLED_WAIT_S]  # running again: no more waits
