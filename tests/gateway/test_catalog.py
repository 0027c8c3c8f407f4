"""The model catalog: every gateway process parses the published model ahead of requests."""

from __future__ import annotations

import redis

from services.gateway.catalog import ModelCatalog, parse_model
from shared.keys import Keys
from shared.schemas import dump
from tests.gateway.conftest import GatewayFactory
from tests.gateway.echo_worker import model_info
from tests.processes import wait_for


def _catalog(gateway_app: object) -> ModelCatalog:
    return gateway_app.state.gateway.catalog  # type: ignore[attr-defined, no-any-return]


def test_the_gateway_loads_a_published_model_before_any_request(
    start_gateway: GatewayFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    gateway = start_gateway(model_refresh_s=0.2)
    catalog = _catalog(gateway.app)
    assert catalog.loaded is None  # nothing published yet
    redis_client.set(keys.model_info, dump(model_info("org/First")))
    # No request is made: the app's own watcher must have parsed it.
    wait_for(lambda: catalog.loaded is not None, 20, "the published model to be loaded")
    assert catalog.loaded is not None and catalog.loaded.served_name == "org/First"

    redis_client.set(keys.model_info, dump(model_info("org/Second")))
    wait_for(
        lambda: catalog.loaded is not None and catalog.loaded.served_name == "org/Second",
        20,
        "a newly published model to replace the first",
    )


def test_a_broken_model_info_keeps_the_watcher_going(
    start_gateway: GatewayFactory, redis_client: redis.Redis, keys: Keys
) -> None:
    gateway = start_gateway(model_refresh_s=0.2)
    catalog = _catalog(gateway.app)
    redis_client.set(keys.model_info, "{not json")
    wait_for(lambda: catalog.last_error is not None, 20, "the broken model info to be seen")
    redis_client.set(keys.model_info, dump(model_info("org/Fixed")))
    wait_for(lambda: catalog.loaded is not None, 20, "the fixed model to be loaded")
    assert catalog.last_error is None


def test_prompts_encode_to_the_tokenizer_s_own_ids() -> None:
    """The gateway's fast path (no character offsets) gives exactly the ids of the
    tokenizer's encode, special tokens included or not."""
    from services.worker.model import synthetic_tokenizer

    tokenizer = synthetic_tokenizer(512).backend_tokenizer
    info = model_info().model_copy(update={"tokenizer_json": tokenizer.to_str()})
    served = parse_model(dump(info))
    texts = [
        "The capital of France is",
        "  two  spaces, tabs\tand\nnewlines ",
        "unicode: déjà vu, 東京, emoji 🚀",
        "x" * 3000,
        "<s> a literal <s> and </s>",
    ]
    for text in texts:
        assert served.encode_prompt(text) == tokenizer.encode(text).ids
        assert served.encode_rendered(text) == tokenizer.encode(text, add_special_tokens=False).ids
    assert served.encode_prompt("hi")[0] == 1  # <s> added
