"""Several workers behind one gateway: the load, who answered what, a worker's crash.

Shared by the ``scaleout`` and ``colocated`` scenarios, on :class:`~experiments.
scenarios.system.Services`. Each configuration gets warm-up requests first (two per
worker, not timed), then every prompt at once, as the system scenario fires them.

Who answered: every completion carries ``aegis.results[0]``, the request id and the id
of the worker whose answer was published (publish-once, in the request's result
stream). That is the answer the client got, so it counts each request exactly once
even when a worker is killed (the records a killed worker's writer still buffered die
with it). Requests answered more than once would show as an id seen twice; work run
twice (a lapsed claim: the loser's answer is dropped) shows in the workers' logs
(``redundant_runs``), as do the entries a worker reclaimed from a dead one.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from experiments import workloads
from experiments.client import Answer, Monitor, Progress
from experiments.context import BenchContext
from experiments.measure import RunResult
from experiments.scenarios.system import Services, _text_of
from shared.keys import WORKER_GROUP
from shared.queue import FIELD
from shared.replies import as_text
from shared.schemas import GenerationRequest, load

CPU_NOTE = (
    "CPU workers (one thread each) at tiny scale: a check of the code path; the figures "
    "mean nothing (the workers and the gateway share the host's cores)"
)
REDUNDANT = "was answered already by another delivery"
RECLAIMED = re.compile(r"reclaimed (\d+) request\(s\)")
KV_POOL = re.compile(r"KV pool: (\d+) blocks of (\d+) tokens = (\d+) MiB")
KILL_POLL_S = 0.01


def gpus(ctx: BenchContext) -> int:
    """GPUs this process sees (0 on a CPU run)."""
    return int(torch.cuda.device_count()) if ctx.cuda else 0


def device_env(ctx: BenchContext, index: int) -> dict[str, str]:
    """Environment giving a worker the ``index``-th GPU this process sees as its cuda:0
    (a ``CUDA_VISIBLE_DEVICES`` already set is honoured). On a CPU run: one thread per
    worker, so that workers sharing the host do not oversubscribe its cores."""
    if not ctx.cuda:
        return {"OMP_NUM_THREADS": "1"}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()] or [str(i) for i in range(gpus(ctx))]
    return {"CUDA_VISIBLE_DEVICES": ids[index]}


def prompts(ctx: BenchContext, workload: str, copies: int) -> tuple[list[str], list[int]]:
    """``workload`` ``copies`` times over as prompt texts and their max_tokens: copy ``k``
    is drawn with seed + ``k`` (the same shapes, other tokens: no two prompts alike)."""
    load_ = workloads.workload(workload, ctx.scale)
    bos = ctx.model().tokenizer.bos_token_id
    texts, budgets = [], []
    for k in range(copies):
        phases = workloads.generate(
            load_, ctx.seed + k, ctx.vocab_size(), 1 if bos is None else bos
        )
        for _, requests in phases:
            for r in requests:
                texts.append(_text_of(ctx, r.prompt_token_ids)[0])
                budgets.append(r.params.max_tokens)
    return texts, budgets


def env_of(cfg: dict[str, Any]) -> dict[str, str]:
    """The scenario's ``env`` setting (for every process) as strings."""
    return {str(k): str(v) for k, v in (cfg.get("env") or {}).items()}


# -- a worker killed mid-run ----------------------------------------------------------------


@dataclass
class Kill:
    """A monitor that SIGKILLs ``victim`` once ``after_answers`` answers are in and the
    victim holds requests, then notes which requests it held (its pending entries)."""

    services: Services
    victim: str
    after_answers: int
    at_answers: int | None = None
    at_s: float | None = None
    killed_at: float = 0.0
    held: list[str] = field(default_factory=list)
    note: str = ""

    async def __call__(self, progress: Progress) -> None:
        while progress.done < progress.total:
            due = progress.answered >= self.after_answers
            if due and await asyncio.to_thread(pending_of, self.services, self.victim) > 0:
                await asyncio.to_thread(self._kill, progress)
                return
            await progress.next_answer(KILL_POLL_S)  # at once when answers come in
        self.note = "not killed: every request was answered before the worker held any"

    def _kill(self, progress: Progress) -> None:
        self.at_answers = progress.answered
        self.killed_at = time.perf_counter()
        self.at_s = round(self.killed_at - progress.start, 3)
        self.services.kill_worker(self.victim)
        self.held = held_by(self.services, self.victim)

    def report(self, answers: list[Answer | None], survivor: str) -> dict[str, Any]:
        """What became of the requests the victim held when it died."""
        by_request = {a.request_id: a for a in answers if a is not None}
        ids = self.services.worker_ids
        got = [by_request[r] for r in self.held if r in by_request]
        last = max((a.at for a in got), default=None)
        return {
            "worker": self.victim,
            "survivor": survivor,
            "after_answers": self.after_answers,
            "at_answers": self.at_answers,
            "at_s": self.at_s,
            "held_at_kill": len(self.held),
            "finished_by_survivor": sum(a.worker_id == ids[survivor] for a in got),
            # Published before it died but not yet acknowledged: the reclaim only acks.
            "answered_by_killed_before_ack": sum(a.worker_id == ids[self.victim] for a in got),
            "unanswered": len(self.held) - len(got),
            "recovery_s": None if last is None else round(last - self.killed_at, 3),
            "note": self.note,
        }


def _client(services: Services) -> Any:
    import redis

    return redis.Redis.from_url(services.redis_url, socket_timeout=5)


def pending_of(services: Services, name: str) -> int:
    """Stream entries delivered to worker ``name`` and not acknowledged."""
    summary: Any = _client(services).xpending(services.keys.requests, WORKER_GROUP)
    consumer = services.consumer(name)
    consumers = summary.get("consumers") or []
    return sum(int(c["pending"]) for c in consumers if as_text(c["name"]) == consumer)


def held_by(services: Services, name: str) -> list[str]:
    """Ids of the requests worker ``name`` holds: delivered to it, not acknowledged."""
    client = _client(services)
    requests = services.keys.requests
    pending: Any = client.xpending_range(
        requests, WORKER_GROUP, "-", "+", 1_000_000, services.consumer(name)
    )
    pipe = client.pipeline(transaction=False)
    for entry in pending:
        pipe.xrange(requests, entry["message_id"], entry["message_id"], count=1)
    return [
        load(GenerationRequest, fields[FIELD.encode()]).id
        for entries in pipe.execute()
        for _, fields in entries
    ]


def oom_events(services: Services) -> dict[str, int]:
    """OOM events each worker published on the events stream, by worker name."""
    names = {worker_id: name for name, worker_id in services.worker_ids.items()}
    counts = dict.fromkeys(services.worker_ids, 0)
    for _, fields in _client(services).xrange(services.keys.events_stream):
        if fields.get(b"kind") == b"oom":
            worker_id = json.loads(fields[b"data"]).get("worker_id", "")
            if worker_id in names:
                counts[names[worker_id]] += 1
    return counts


# -- one configuration ----------------------------------------------------------------------


def _log_marks(text: str) -> tuple[int, int]:
    """(runs whose answer was dropped as redundant, entries reclaimed) in a worker log."""
    return text.count(REDUNDANT), sum(int(n) for n in RECLAIMED.findall(text))


def _kv_pool_mib(text: str) -> int | None:
    found = KV_POOL.findall(text)
    return int(found[-1][2]) if found else None


def run_config(
    services: Services,
    label: str,
    texts: list[str],
    budgets: list[int],
    kill: Kill | None = None,
) -> dict[str, Any]:
    """Warm up, fire every prompt at once, and say who answered what.

    With ``kill``, one worker is killed mid-run and its report is under ``kill``.
    """
    workers = services.workers()
    services.warm_up(2 * len(workers))
    before = {n: _log_marks(services.log_text(n)) for n in workers}
    monitor: Monitor | None = kill
    result, answers = services.load(texts, budgets, monitor)
    data = tally(services, label, workers, result, answers, budgets, before)
    if kill is not None:
        survivor = next(n for n in workers if n != kill.victim)
        data["kill"] = kill.report(answers, survivor)
    return data


def tally(
    services: Services,
    label: str,
    workers: list[str],
    result: RunResult,
    answers: list[Answer | None],
    budgets: list[int],
    before: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    """The run's figures, per worker too, and whether each request was answered once."""
    names = {worker_id: name for name, worker_id in services.worker_ids.items()}
    per_worker: dict[str, dict[str, Any]] = {n: {"requests": 0, "tokens": 0} for n in workers}
    seen: Counter[str] = Counter()
    unattributed = 0
    for answer, budget in zip(answers, budgets, strict=True):
        if answer is None:
            continue
        seen[answer.request_id] += 1
        name = names.get(answer.worker_id)
        if name is None or not answer.request_id:
            unattributed += 1
            continue
        row = per_worker.setdefault(name, {"requests": 0, "tokens": 0})
        row["requests"] += 1
        row["tokens"] += min(answer.tokens, budget)
    ooms = oom_events(services)
    for name, row in per_worker.items():
        text = services.log_text(name)
        redundant, reclaimed = _log_marks(text)
        old = before.get(name, (0, 0))
        row.update(
            worker_id=services.worker_ids[name],
            tokens_per_s=round(row["tokens"] / result.seconds, 3) if result.seconds else 0.0,
            redundant_runs=redundant - old[0],
            reclaimed=reclaimed - old[1],
            oom_events=ooms.get(name, 0),
            kv_pool_mib=_kv_pool_mib(text),
            startup_s=services.startup_s.get(name),
            env=services.worker_env.get(name, {}),
        )
    result.oom_events = sum(row["oom_events"] for row in per_worker.values())
    duplicates = sum(count - 1 for count in seen.values())
    answered_once = sum(1 for request_id, count in seen.items() if request_id and count == 1)
    exits = {n: code for n, code in services.exited().items() if n in per_worker}
    data = result.to_dict()
    data.update(
        configuration=label,
        workers=len(workers),
        per_worker=per_worker,
        answered_once=answered_once,
        duplicates=duplicates,
        unattributed=unattributed,
        exactly_once=result.failed == 0
        and duplicates == 0
        and unattributed == 0
        and answered_once == result.requests,
        redundant_runs=sum(row["redundant_runs"] for row in per_worker.values()),
        reclaimed=sum(row["reclaimed"] for row in per_worker.values()),
        worker_exits=exits,
    )
    return data


def after_fraction(total: int, fraction: float) -> int:
    """How many answers must be in before the kill (at least one, at most all but one)."""
    return min(max(1, math.ceil(total * fraction)), max(1, total - 1))
