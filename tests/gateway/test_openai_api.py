"""The OpenAI-compatible API through the official ``openai`` client, answered by the echo worker."""

from __future__ import annotations

import pytest

from tests.gateway.conftest import GatewayFactory, RunningGateway
from tests.gateway.echo_worker import WORKER_ID, EchoWorker, echo_answer, render_chat


def test_completion_returns_the_worker_answer_with_usage(gateway: RunningGateway) -> None:
    prompt = "Hello, AEGIS!"
    reply = gateway.openai().completions.create(model="anything", prompt=prompt, max_tokens=5)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    assert reply.model == "synthetic:tiny"
    assert [c.text for c in reply.choices] == ["!SIGE"]
    assert reply.choices[0].finish_reason == "length"
    # <s> plus one token per byte.
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt) + 1, 5)
    assert reply.usage.total_tokens == len(prompt) + 6
    extra = reply.model_extra or {}
    assert extra["aegis"]["synthetic"] is True
    assert extra["aegis"]["results"][0]["worker_id"] == WORKER_ID


def test_completion_defaults_to_16_tokens_and_honours_stop(gateway: RunningGateway) -> None:
    client = gateway.openai()
    long = client.completions.create(model="m", prompt="abcdefghijklmnopqrstuvwxyz")
    assert long.choices[0].text == "zyxwvutsrqponmlk"
    stopped = client.completions.create(model="m", prompt="abcdef", stop=["c"], max_tokens=10)
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("fed", "stop")


def test_n_and_prompt_lists_give_one_choice_each(gateway: RunningGateway) -> None:
    client = gateway.openai()
    reply = client.completions.create(model="m", prompt=["ab", "xyz"], n=2, max_tokens=8)
    assert [(c.index, c.text) for c in reply.choices] == [
        (0, "ba"),
        (1, "ba"),
        (2, "zyx"),
        (3, "zyx"),
    ]
    assert reply.usage is not None
    # Each prompt counted once; every choice's tokens counted.
    assert reply.usage.prompt_tokens == 3 + 4
    assert reply.usage.completion_tokens == 2 + 2 + 3 + 3


def test_chat_completion_renders_the_template(gateway: RunningGateway) -> None:
    messages = [("system", "be brief"), ("user", "hi there")]
    reply = gateway.openai().chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi there"},
        ],
        max_completion_tokens=6,
    )
    rendered = render_chat(messages)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == "synthetic:tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == rendered[::-1][:6]
    assert reply.usage is not None
    # <s> is one special token; the rest one token per byte.
    assert reply.usage.prompt_tokens == 1 + len(rendered) - len("<s>")
    assert reply.usage.completion_tokens == 6


def test_chat_accepts_text_parts_and_n(gateway: RunningGateway) -> None:
    reply = gateway.openai().chat.completions.create(
        model="m",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
        n=2,
        max_tokens=40,
    )
    expected, _ = echo_answer(render_chat([("user", "ab")]), 40, [])
    assert [c.message.content for c in reply.choices] == [expected, expected]
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]


def test_completion_stream_yields_the_text_then_usage(gateway: RunningGateway) -> None:
    stream = gateway.openai().completions.create(
        model="m",
        prompt="streaming!",
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 3  # streamed in pieces, not at once
    assert "".join(texts) == "!gnimaer"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.object == "text_completion" and c.model == "synthetic:tiny" for c in chunks)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 8)


def test_chat_stream_opens_with_the_role_and_ends_with_a_reason(gateway: RunningGateway) -> None:
    stream = gateway.openai().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "stream me"}], max_tokens=7, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == render_chat([("user", "stream me")])[::-1][:7]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_stream_with_n_keeps_choices_apart(gateway: RunningGateway) -> None:
    stream = gateway.openai().completions.create(
        model="m", prompt=["abcdefg", "1234567"], max_tokens=7, stream=True
    )
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: "gfedcba", 1: "7654321"}


def test_a_worker_failure_is_a_server_error(gateway: RunningGateway) -> None:
    import openai

    client = gateway.openai()
    with pytest.raises(openai.InternalServerError, match="echo worker told to fail"):
        client.completions.create(model="m", prompt="please FAIL")
    with pytest.raises(openai.APIError, match="echo worker told to fail"):
        list(client.completions.create(model="m", prompt="please FAIL", stream=True))


def test_models_lists_the_served_model(gateway: RunningGateway) -> None:
    models = gateway.openai().models.list()
    assert [m.id for m in models.data] == ["synthetic:tiny"]
    card = models.data[0]
    assert card.owned_by == "aegis"
    assert (card.model_extra or {})["synthetic"] is True
    assert (card.model_extra or {})["context_length"] == 256


def test_models_retrieve_by_id_or_alias(gateway: RunningGateway) -> None:
    import openai

    client = gateway.openai()
    for name in ("synthetic:tiny", "tiny"):
        model = client.models.retrieve(name)
        assert model.id == "synthetic:tiny"
        assert (model.model_extra or {})["context_length"] == 256
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert missing.value.code == "model_not_found"


def test_strict_names_refuse_an_unknown_model(
    start_gateway: GatewayFactory, echo: EchoWorker
) -> None:
    import openai

    client = start_gateway(strict_model_names=True, model_aliases="gpt-3.5-turbo").openai()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="llama", prompt="a", max_tokens=1)
    for name in ("synthetic:tiny", "tiny", "gpt-3.5-turbo"):
        reply = client.completions.create(model=name, prompt="ab", max_tokens=2)
        assert (reply.model, reply.choices[0].text) == ("synthetic:tiny", "ba")
