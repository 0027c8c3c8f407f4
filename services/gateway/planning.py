"""From a validated HTTP body to the :class:`GenerationRequest` s to queue.

Checks that depend on settings or on the served model live here (bounds on
``max_tokens``, ``n``, ``stop``; empty prompts; the context length; the model name;
fields AEGIS does not apply), each failing with a 400 (404 for an unknown model)
:class:`ApiError` that names the parameter. Nothing is cut or lowered to make a request
fit: it is refused with the reason. Choice ``i`` of a body is request
``<response id>-<i>``; with several prompts, choice ``p * n + j`` is sample ``j`` of
prompt ``p`` (OpenAI's order).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from services.gateway.catalog import ChatTemplateError, ServedModel
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError, bad_request
from services.gateway.schemas import (
    INT64_MAX,
    INT64_MIN,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
)
from shared.schemas import GenerationRequest, RequestKind, SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Plan:
    """The requests answering one HTTP body, and what its response needs."""

    response_id: str
    created: int
    model_name: str
    synthetic: bool
    prompt_tokens: int
    requests: list[GenerationRequest]
    include_usage: bool = False


def _stops(body: SamplingFields, settings: GatewaySettings) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > settings.max_stop:
        raise bad_request(
            f"stop may hold at most {settings.max_stop} strings, got {len(stops)}", "stop"
        )
    if any(not stop for stop in stops):
        raise bad_request("stop strings must not be empty", "stop")
    if any(len(stop) > settings.max_stop_chars for stop in stops):
        raise bad_request(
            f"stop strings may be at most {settings.max_stop_chars} characters long", "stop"
        )
    return stops


def _unsupported(param: str, what: str) -> ApiError:
    return bad_request(
        f"{param}: {what} is not supported by this server; leave it unset", param,
        "unsupported_parameter",
    )  # fmt: skip


def _refuse_unapplied(body: SamplingFields) -> None:
    """Fields a client may send but AEGIS would not apply: refused, not silently ignored."""
    for param in ("presence_penalty", "frequency_penalty"):
        if getattr(body, param):
            raise _unsupported(param, "a non-zero penalty")
    if body.logit_bias:
        raise _unsupported("logit_bias", "a logit bias")


def _refuse_completion_extras(body: CompletionRequest) -> None:
    if body.logprobs is not None:
        raise _unsupported("logprobs", "returning logprobs")
    if body.echo:
        raise _unsupported("echo", "echoing the prompt")
    if body.suffix:
        raise _unsupported("suffix", "a suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise _unsupported("best_of", "best_of other than n")


def check_model_name(name: str | None, model: ServedModel, settings: GatewaySettings) -> None:
    """404 ``model_not_found`` for a name that is neither the served model nor an alias.

    Only with ``strict_model_names``; otherwise any name is answered by the served model
    (whose name every response carries in ``model``).
    """
    if name is None or not settings.strict_model_names:
        return
    if name in model.names() or name in settings.model_aliases:
        return
    raise ApiError(
        404,
        f"The model `{name}` does not exist on this server; it serves `{model.served_name}`",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def _choices(body: SamplingFields, settings: GatewaySettings) -> int:
    n = body.n or 1
    if n > settings.max_n:
        raise bad_request(f"n must be between 1 and {settings.max_n}, got {n}", "n")
    return n


def _max_tokens(
    requested: int | None,
    default: int | None,
    prompt_len: int,
    model: ServedModel,
    settings: GatewaySettings,
    param: str,
) -> int:
    """The completion budget, checked against the limit and the context length."""
    if requested is not None and requested > settings.max_tokens_limit:
        raise bad_request(
            f"{param} must be at most {settings.max_tokens_limit}, got {requested}", param
        )
    context = model.info.context_length
    room = context - prompt_len
    if requested is None:
        # At least one token, so that a prompt filling the context fails the check below.
        requested = max(1, min(default or room, settings.max_tokens_limit))
    if prompt_len + requested > context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or {param}.",
            param,
            "context_length_exceeded",
        )
    return requested


def _params(body: SamplingFields, max_tokens: int, stops: list[str], sample: int) -> SamplingParams:
    # Distinct seeds per sample: n>1 with one seed would return n identical choices.
    # Wrapped so that the seed of every sample stays a signed 64-bit integer.
    seed = None if body.seed is None else _wrap_int64(body.seed + sample)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stops,
        seed=seed,
        ignore_eos=body.ignore_eos,
    )


def _wrap_int64(value: int) -> int:
    return (value - INT64_MIN) % (INT64_MAX - INT64_MIN + 1) + INT64_MIN


def _new_plan(prefix: str, model: ServedModel, body: SamplingFields) -> Plan:
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return Plan(
        response_id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model_name=model.served_name,
        synthetic=model.info.synthetic,
        prompt_tokens=0,
        requests=[],
        include_usage=include_usage,
    )


def _add_prompt(
    plan: Plan,
    body: SamplingFields,
    kind: RequestKind,
    prompt: str,
    ids: list[int],
    max_tokens: int,
    stops: list[str],
    n: int,
) -> None:
    plan.prompt_tokens += len(ids)
    for sample in range(n):
        plan.requests.append(
            GenerationRequest(
                id=f"{plan.response_id}-{len(plan.requests)}",
                kind=kind,
                prompt=prompt,
                prompt_token_ids=ids,
                params=_params(body, max_tokens, stops, sample),
                stream=bool(body.stream),
            )
        )


def _check_size(chars: int, settings: GatewaySettings, param: str) -> None:
    if chars > settings.max_prompt_chars:
        raise bad_request(
            f"{param} is too long: {chars} characters, at most {settings.max_prompt_chars}", param
        )


def plan_completion(body: CompletionRequest, model: ServedModel, settings: GatewaySettings) -> Plan:
    """Requests for ``/v1/completions``; 400 ApiError on a bad body."""
    check_model_name(body.model, model, settings)
    _refuse_unapplied(body)
    _refuse_completion_extras(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt")
    if len(prompts) > settings.max_prompts:
        raise bad_request(f"prompt may list at most {settings.max_prompts} prompts", "prompt")
    if any(not prompt for prompt in prompts):
        raise bad_request("prompt must not be empty", "prompt")
    _check_size(sum(len(prompt) for prompt in prompts), settings, "prompt")
    n, stops = _choices(body, settings), _stops(body, settings)
    plan = _new_plan("cmpl", model, body)
    for prompt in prompts:
        ids = model.encode_prompt(prompt)
        budget = _max_tokens(
            body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, len(ids), model, settings, "max_tokens"
        )
        _add_prompt(plan, body, "completion", prompt, ids, budget, stops, n)
    return plan


def render_messages(body: ChatRequest, model: ServedModel) -> str:
    """The chat's prompt text; 400 ApiError when empty or refused by the template."""
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    if not any(message["content"] for message in messages):
        raise bad_request("messages must not all be empty", "messages")
    try:
        return model.render_chat(messages)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from exc


def plan_chat(body: ChatRequest, model: ServedModel, settings: GatewaySettings) -> Plan:
    """Requests for ``/v1/chat/completions``; 400 ApiError on a bad body."""
    check_model_name(body.model, model, settings)
    _refuse_unapplied(body)
    if body.logprobs:
        raise _unsupported("logprobs", "returning logprobs")
    if body.top_logprobs:
        raise _unsupported("top_logprobs", "returning logprobs")
    n, stops = _choices(body, settings), _stops(body, settings)
    _check_size(sum(len(m.text()) for m in body.messages), settings, "messages")
    prompt = render_messages(body, model)
    ids = model.encode_rendered(prompt)
    requested, param = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        requested, param = body.max_completion_tokens, "max_completion_tokens"
    budget = _max_tokens(requested, None, len(ids), model, settings, param)
    plan = _new_plan("chatcmpl", model, body)
    _add_prompt(plan, body, "chat", prompt, ids, budget, stops, n)
    return plan
