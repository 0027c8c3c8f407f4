"""The benchmarks' multi-process load client against a real gateway and the echo worker."""

from __future__ import annotations

import asyncio

from experiments.client import Progress, post_all
from tests.gateway.conftest import RunningGateway


def test_every_answer_comes_back_from_several_client_processes(gateway: RunningGateway) -> None:
    texts = [f"prompt {i}" for i in range(24)]
    seen: list[int] = []

    async def monitor(progress: Progress) -> None:
        while progress.done < progress.total:
            seen.append(progress.answered)
            await asyncio.sleep(0.01)
        seen.append(progress.answered)

    load = asyncio.run(post_all(gateway.settings.gateway_port, texts, [3] * 24, 3, monitor))
    assert all(a is not None for a in load.answers)
    ids = [a.request_id for a in load.answers if a]
    assert len(set(ids)) == len(ids) == 24  # each answered once, under its own id
    assert all(a.tokens == 3 and a.finish_reason == "length" for a in load.answers if a)
    # The clock stops at the last answer's arrival, not at the clients' exit.
    assert load.end == max(a.at for a in load.answers if a) > load.start
    assert seen[-1] == 24 and seen == sorted(seen)  # the monitor saw progress grow


def test_a_refused_request_is_a_failure_not_a_crash(gateway: RunningGateway) -> None:
    too_long = "x" * 100_000  # over the gateway's limits: a 4xx, not retried
    load = asyncio.run(post_all(gateway.settings.gateway_port, ["ok", too_long], [2, 2], 2))
    assert load.answers[0] is not None and load.answers[1] is None
