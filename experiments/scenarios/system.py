"""System: W1 through the whole request path vs AEGIS's engine alone on the same load.

Starts Redis (when none answers; a carried ``.device/redis/redis-server`` is found),
the gateway (``python -m services.gateway``) and one worker (``python -m
services.worker``) as processes with their own key prefix, port and SQLite file, then
fires every request at once at ``/v1/completions`` (httpx, async) and waits for all
answers. The engine alone then runs the same token ids at the same batch size with the
worker's look-ahead, in this process. The ratio shows the system's overhead (HTTP,
tokenizing, Redis streams, result delivery, records).

Prompts travel as text: each request's random ids are decoded, and the engine alone is
given the ids the gateway's tokenizer makes of that text, so both run the same tokens.
EOS: the gateway has no field to ignore it (``ignore_eos`` is sent and dropped); a
random-weight model rarely emits it, and completions that stop early are counted.
A 429 or 503 (queue bound, the gateway's Redis connections) is retried after 0.1 s,
as a client would; the retries are counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import IO, Any

from experiments.context import BenchContext
from experiments.loadtest import Connection
from experiments.measure import ROOT, RunResult
from experiments.scenarios.common import ratio, runner, settings
from shared.config import CommonSettings
from shared.redis_server import ensure_redis
from shared.schemas import GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

CARRIED_REDIS = ROOT / ".device" / "redis"
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 900.0
RETRY_STATUS = (429, 503)
RETRY_DELAY_S = 0.1
# AEGIS_GATEWAY_PROCESSES of the gateway, unless the scenario's config says otherwise.
GATEWAY_PROCESSES = 4


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = ctx.config("system")
    batch = int(cfg["batch_size"])
    texts, requests = _prompts(ctx, cfg["workload"])
    with Services(ctx, batch) as services:
        system = services.fire(texts, requests)
    with ctx.bar(len(requests), "engine alone") as bar:
        engine, _ = runner(ctx).run(requests, settings(ctx, batch), system="aegis_engine", bar=bar)
    return {
        "workload": cfg["workload"],
        "config": cfg,
        "system": system.to_dict(),
        "engine": engine.to_dict(),
        "ratio_system_vs_engine": ratio(system.tokens_per_s, engine.tokens_per_s),
    }


def _prompts(ctx: BenchContext, workload: str) -> tuple[list[str], list[GenerationRequest]]:
    """Prompt texts, and requests holding the ids the gateway will make of them."""
    texts, requests = [], []
    for _, phase in ctx.requests(workload):
        for r in phase:
            text, ids = _text_of(ctx, r.prompt_token_ids)
            texts.append(text)
            params = SamplingParams(max_tokens=r.params.max_tokens, temperature=0.0)
            requests.append(
                GenerationRequest(id=r.id, prompt=text, prompt_token_ids=ids, params=params)
            )
    return texts, requests


def _text_of(ctx: BenchContext, ids: list[int]) -> tuple[str, list[int]]:
    """Text whose encoding (BOS included) is at most ``len(ids)`` tokens, and that encoding.

    Random ids decode to text that re-encodes longer (byte pieces merge differently), so
    the ids are cut until the text fits the workload's prompt length.
    """
    tokenizer = ctx.model().tokenizer
    target, body = len(ids), ids[1:]
    while True:
        text = str(tokenizer.decode(body))
        encoded = list(tokenizer.backend_tokenizer.encode(text, add_special_tokens=True).ids)
        if len(encoded) <= target or len(body) <= 1:
            return text, encoded
        body = body[: max(1, min(len(body) - 1, len(body) * target // len(encoded)))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Services:
    """Redis (if needed), gateway and worker as processes; logs under ``<out>/logs``."""

    def __init__(self, ctx: BenchContext, batch: int) -> None:
        self.ctx = ctx
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.redis_url = CommonSettings().redis_url
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.logs = ctx.out / "logs"
        self.env = self._env(batch)
        self.redis: subprocess.Popen[bytes] | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.log_files: list[IO[bytes]] = []

    def _env(self, batch: int) -> dict[str, str]:
        ctx = self.ctx
        return {
            **os.environ,
            "AEGIS_REDIS_URL": self.redis_url,
            "AEGIS_KEY_PREFIX": self.prefix,
            "AEGIS_GATEWAY_PORT": str(self.port),
            "AEGIS_DATABASE_URL": f"sqlite:///{(ctx.out / 'system.db').resolve()}",
            "AEGIS_DATA_DIR": str((ctx.out / "system-data").resolve()),
            "AEGIS_MODEL": ctx.model_name,
            "AEGIS_DEVICE": ctx.device,
            "AEGIS_PRECISION": ctx.precision,
            "AEGIS_BATCH_SIZE": str(batch),
            "AEGIS_MAX_BATCHED_TOKENS": str(ctx.max_batched_tokens),
            "AEGIS_KV_BUDGET_BYTES": str(ctx.kv_budget_bytes),
            "AEGIS_WORKER_ID": f"{self.prefix}-worker",
            "AEGIS_LOG_LEVEL": "INFO",  # one line per window of steps: the run's timeline
            "AEGIS_MAX_QUEUE_DEPTH": "100000",
            "AEGIS_GATEWAY_PROCESSES": str(
                ctx.config("system").get("gateway_processes", GATEWAY_PROCESSES)
            ),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def __enter__(self) -> Services:
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self.redis = ensure_redis(self.redis_url, self.ctx.out / "redis", bundled=CARRIED_REDIS)
            for name in ("gateway", "worker"):
                self._start(name)
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ("worker", "gateway"):
            process = self.children.pop(name, None)
            if process is not None:
                _stop(process)
        for handle in self.log_files:
            handle.close()
        self._clean_keys()
        if self.redis is not None:
            _stop(self.redis)
            self.redis = None

    def _start(self, name: str) -> None:
        log_file = (self.logs / f"{name}.log").open("wb")
        self.log_files.append(log_file)
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            cwd=ROOT,
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, process in self.children.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}): {self._tail(name)}")
            try:
                if httpx.get(f"{self.base}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"system not ready after {READY_TIMEOUT_S:.0f}s: {self._tail('worker')}")

    def _tail(self, name: str) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return text[-2000:]

    def _clean_keys(self) -> None:
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
            for key in client.scan_iter(f"{self.prefix}*", count=1000):
                client.delete(key)
        except Exception as exc:  # cleanup only: never hide the benchmark's result
            log.warning("could not delete the benchmark's Redis keys: %s", exc)

    def fire(self, texts: list[str], requests: list[GenerationRequest]) -> RunResult:
        """Every prompt at once; one warm-up request first (not timed)."""
        asyncio.run(_post_all(self.base, ["warm up"], [2]))
        budgets = [r.params.max_tokens for r in requests]
        start = time.perf_counter()
        answers = asyncio.run(_post_all(self.base, texts, budgets))
        result = RunResult("aegis_system", len(requests), seconds=time.perf_counter() - start)
        result.batch_size = int(self.env["AEGIS_BATCH_SIZE"])
        early = retries = 0
        for answer, budget in zip(answers, budgets, strict=True):
            if answer is None:
                result.failed += 1
                continue
            result.completed += 1
            result.tokens += min(answer.tokens, budget)
            early += answer.finish_reason != "length"
            retries += answer.retries
        result.extra = {"stopped_before_max_tokens": early, "retried_429_503": retries}
        return result


@dataclass
class Answer:
    """One completion as the client saw it."""

    tokens: int
    finish_reason: str
    retries: int


async def _post_all(base: str, texts: list[str], budgets: list[int]) -> list[Answer | None]:
    """Every completion at once, one keep-alive connection each (the load test's client:
    httpx's async pool, not the gateway, was the bottleneck at this concurrency)."""
    port = int(base.rsplit(":", 1)[1].split("/")[0])
    calls = [_post(Connection(port), t, b) for t, b in zip(texts, budgets, strict=True)]
    return list(await asyncio.gather(*calls))


async def _post(connection: Connection, text: str, budget: int) -> Answer | None:
    """One completion; a 429/503 (queue full, Redis busy) is retried as a client would."""
    body = {"model": "bench", "prompt": text, "max_tokens": budget, "temperature": 0}
    body["ignore_eos"] = True  # dropped by today's gateway (no such field): see module doc
    payload = json.dumps(body).encode()
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    try:
        for retry in itertools.count():
            try:
                status, _, content = await connection.post("/v1/completions", payload)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                log.warning("request failed: %s", exc)
                return None
            if status in RETRY_STATUS and time.monotonic() < deadline:
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            if status != 200:
                log.warning("request answered %d: %s", status, content[:200])
                return None
            data = json.loads(content)
            usage, choice = data["usage"], data["choices"][0]
            return Answer(int(usage["completion_tokens"]), str(choice["finish_reason"]), retry)
        return None
    finally:
        await connection.close()


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
