"""A stand-in for the GPU worker in gateway tests: deterministic answers, real queue.

It publishes a :class:`ModelInfo` with a real byte-level tokenizer (one token per byte,
``<s>`` added in front of raw prompts) and a small chat template, then answers each
request with its prompt reversed, cut to ``max_tokens`` characters (ASCII: one token
each) and at the first stop string. Streaming requests get deltas of three characters.
Prompts containing ``FAIL`` get an error result; ``SLOW`` makes deltas 50 ms apart.
Like a real worker it registers in ``Keys.workers`` with a heartbeat key (TTL), stops
streaming a request whose cancel key is set, and rides out a Redis restart.
"""

from __future__ import annotations

import threading
import time

import redis
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from shared.keys import Keys
from shared.queue import Delivery, WorkerQueue
from shared.schemas import GenerationResult, ModelInfo, TokenDelta, WorkerInfo, dump, now

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('Conversation must not start with the assistant') }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORKER_ID = "echo-1"
HEARTBEAT_TTL_S = 5


def byte_tokenizer() -> Tokenizer:
    """One token per byte (no merges), ``<s>``/``</s>`` special, ``<s>`` prepended."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1} | {char: i + 2 for i, char in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    return tokenizer


def model_info(name: str = "synthetic:tiny", context_length: int = 256) -> ModelInfo:
    return ModelInfo(
        name=name,
        requested=name,
        synthetic=name.startswith("synthetic:"),
        context_length=context_length,
        tokenizer_json=byte_tokenizer().to_str(),
        chat_template=CHAT_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
    )


def render_chat(messages: list[tuple[str, str]]) -> str:
    """What the gateway should render for ``messages`` with :data:`CHAT_TEMPLATE`."""
    body = "".join(f"<|{role}|>{content}\n" for role, content in messages)
    return f"<s>{body}<|assistant|>"


def echo_answer(prompt: str, max_tokens: int, stops: list[str]) -> tuple[str, str]:
    """The text and finish reason the echo worker gives a prompt."""
    source = prompt[::-1]
    text, finish = source[:max_tokens], "length" if len(source) > max_tokens else "stop"
    for stop in stops:
        cut = text.find(stop)
        if cut >= 0:
            text, finish = text[:cut], "stop"
    return text, finish


class EchoWorker:
    """Answers requests in a background thread until :meth:`stop`."""

    def __init__(self, redis_url: str, keys: Keys, info: ModelInfo | None = None) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.keys = keys
        self.queue = WorkerQueue(self.client, keys, WORKER_ID)
        self.info = info or model_info()
        self.answered = 0
        self.cancelled: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-worker", daemon=True)

    def publish_model(self) -> None:
        self.client.set(self.keys.model_info, dump(self.info))

    def register(self) -> None:
        """Announce this worker and beat its heartbeat (what /ready looks for)."""
        info = WorkerInfo(
            worker_id=WORKER_ID, host="test", pid=0, device="cpu", model=self.info.name,
            synthetic=self.info.synthetic,
        )  # fmt: skip
        self.client.hset(self.keys.workers, WORKER_ID, dump(info))
        self.client.set(self.keys.worker_alive(WORKER_ID), "1", ex=HEARTBEAT_TTL_S)

    def start(self) -> EchoWorker:
        self.publish_model()
        self.register()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.delete(self.keys.worker_alive(WORKER_ID))
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.register()
                for delivery in self.queue.pull(8, block_ms=50):
                    self._answer(delivery)
            except (redis.ConnectionError, redis.TimeoutError):
                self._stop.wait(0.1)  # Redis restarting: the requests wait in its AOF

    def _answer(self, delivery: Delivery) -> None:
        request, started = delivery.request, now()
        if "FAIL" in request.prompt:
            self._publish(delivery, "", "error", started, None, error="echo worker told to fail")
            return
        text, finish = echo_answer(request.prompt, request.params.max_tokens, request.params.stop)
        first = now()
        if request.stream:
            for offset in range(0, len(text), 3):
                if "SLOW" in request.prompt:
                    time.sleep(0.05)
                if self.queue.cancelled([request.id]):
                    self.cancelled.append(request.id)
                    text, finish = text[:offset], "stop"
                    break
                delta = TokenDelta(
                    request_id=request.id, offset=offset, text=text[offset : offset + 3]
                )
                self.queue.publish_deltas([delta])
        self._publish(delivery, text, finish, started, first)

    def _publish(
        self,
        delivery: Delivery,
        text: str,
        finish: str,
        started: float,
        first: float | None,
        error: str | None = None,
    ) -> None:
        request = delivery.request
        self.queue.publish_result(
            GenerationResult(
                request_id=request.id,
                text=text,
                finish_reason=finish,  # type: ignore[arg-type]
                prompt_tokens=request.prompt_len,
                completion_tokens=len(text.encode()),
                model=self.info.name,
                worker_id=WORKER_ID,
                queued_at=request.enqueued_at,
                started_at=started,
                first_token_at=first,
                error=error,
            )
        )
        self.queue.ack([delivery.entry_id])
        self.answered += 1
