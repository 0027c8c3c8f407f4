"""The served model as the gateway knows it: tokenizer and chat template, from Redis.

Workers publish a :class:`shared.schemas.ModelInfo` JSON at ``Keys.model_info``. The
gateway never imports torch or transformers: it rebuilds the tokenizer with the
``tokenizers`` library and renders the chat template with jinja2's immutable sandbox,
the way transformers does. The parsed model is cached and reloaded only when the
published JSON's SHA-1 (computed by Redis, so the JSON itself is not transferred)
changes; the check runs at most every ``refresh_s`` seconds while a model is cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import redis.asyncio as aioredis
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from shared.keys import Keys
from shared.schemas import ModelInfo, load

log = logging.getLogger(__name__)

# Returns the SHA-1 of the published JSON, or nil (None) when none is published.
_DIGEST_SCRIPT = (
    "local v = redis.call('GET', KEYS[1]) if not v then return false end return redis.sha1hex(v)"
)

# Used when a model has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (e.g. roles that don't alternate)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template with the environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


@dataclass(frozen=True)
class ServedModel:
    """A published model, parsed: what the gateway needs to validate and tokenize."""

    info: ModelInfo
    tokenizer: Tokenizer
    template: jinja2.Template
    digest: str
    loaded_at: float

    @property
    def served_name(self) -> str:
        """The name clients see; says ``synthetic:`` when the weights are random."""
        name = self.info.name
        if self.info.synthetic and not name.startswith("synthetic:"):
            return f"synthetic:{name}"
        return name

    def names(self) -> set[str]:
        """Every name a client may call this model by: served, loaded, asked for, short."""
        full = {self.served_name, self.info.name, self.info.requested}
        short = {name.removeprefix("synthetic:").rsplit("/", 1)[-1] for name in full}
        return full | short

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt (with the model's special tokens)."""
        return self._encode(text, add_special_tokens=True)

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat: the template already wrote the special tokens."""
        return self._encode(text, add_special_tokens=False)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # The same ids as encode(), without the character offsets it also computes: a
        # third less time for a W1 prompt (250 against 380 us), the largest single cost
        # of a gateway request with a prompt of that size.
        [encoding] = self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation; :class:`ChatTemplateError` if refused."""
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.info.bos_token or "",
                eos_token=self.info.eos_token or "",
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


def parse_model(raw: str | bytes) -> ServedModel:
    """Build a :class:`ServedModel` from a published JSON; ValueError if unusable."""
    digest = hashlib.sha1(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()
    try:
        info = load(ModelInfo, raw)
        tokenizer = Tokenizer.from_str(info.tokenizer_json)
        template = compile_template(info.chat_template or DEFAULT_CHAT_TEMPLATE)
    # tokenizers raises a bare Exception for a bad JSON, so nothing narrower will do.
    except Exception as exc:
        raise ValueError(f"published model info is unusable: {exc}") from exc
    return ServedModel(info, tokenizer, template, digest, time.time())


class ModelCatalog:
    """Cache of the published model, refreshed when its digest changes."""

    def __init__(self, client: aioredis.Redis, keys: Keys, refresh_s: float = 5.0) -> None:
        self.client = client
        self.keys = keys
        self.refresh_s = refresh_s
        self.last_error: str | None = None
        self._model: ServedModel | None = None
        self._failed_digest: str | None = None
        self._checked_at = 0.0
        self._lock = asyncio.Lock()
        self._stopping = False

    @property
    def loaded(self) -> ServedModel | None:
        """The model parsed last, without checking Redis."""
        return self._model

    async def watch(self, idle_poll_s: float = 0.5) -> None:
        """Keep the model loaded ahead of requests (run as a task for the app's life).

        Parsing a tokenizer takes ~100 ms, and each gateway process has its own copy: the
        first requests of a burst would otherwise wait for it. Until a worker publishes
        a model this polls every ``idle_poll_s``, then every half ``refresh_s`` (a
        digest check; a new model is parsed here), so the copy requests read is never
        stale and :meth:`current` does no Redis work on the request path.
        """
        # A flag, not only a cancel: redis-py can swallow a cancel that lands mid-command,
        # and the app's shutdown waits for this task.
        while not self._stopping:
            try:
                await self.current()
            except Exception as exc:  # Redis away: requests report it; keep watching
                log.debug("model watch: %s", exc)
            if not self._stopping:
                await asyncio.sleep(idle_poll_s if self._model is None else self.refresh_s / 2)

    def stop_watching(self) -> None:
        """End :meth:`watch` at its next turn (cancel its task too, to cut a sleep)."""
        self._stopping = True

    async def current(self) -> ServedModel | None:
        """The served model, or ``None`` while no worker has published one."""
        if self._model is not None and time.monotonic() - self._checked_at < self.refresh_s:
            return self._model
        async with self._lock:
            if self._model is None or time.monotonic() - self._checked_at >= self.refresh_s:
                await self._refresh()
        return self._model

    async def _refresh(self) -> None:
        digest = await self.client.eval(_DIGEST_SCRIPT, 1, self.keys.model_info)
        self._checked_at = time.monotonic()
        if digest is None:
            self._model = None
            return
        digest = digest.decode() if isinstance(digest, bytes) else str(digest)
        if digest == self._failed_digest or (self._model and self._model.digest == digest):
            return
        raw = await self.client.get(self.keys.model_info)
        if raw is None:
            self._model = None
            return
        await self._load(raw)

    async def _load(self, raw: bytes | str) -> None:
        try:
            # Parsing a real tokenizer takes ~100 ms: keep it off the event loop.
            model = await asyncio.to_thread(parse_model, raw)
        except ValueError as exc:
            self.last_error = str(exc)
            self._failed_digest = hashlib.sha1(
                raw if isinstance(raw, bytes) else raw.encode()
            ).hexdigest()
            log.error("%s (keeping the previous model)", exc)
            return
        self.last_error = None
        previous, self._model = self._model, model
        log.info(
            "model %s %s (context %d%s)",
            model.served_name,
            "reloaded" if previous else "loaded",
            model.info.context_length,
            ", SYNTHETIC random weights" if model.info.synthetic else "",
        )
