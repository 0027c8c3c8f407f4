"""Dead letters read from a real Redis, read-only, and shaped into the dashboard's table."""

from __future__ import annotations

import time

import pytest
import redis

from services.dashboard import letters
from shared.keys import Keys
from shared.queue import FIELD
from tests.dashboard.seed import DEAD_ERRORS, seed_dead_letters


def test_window_newest_first_and_total(redis_client: redis.Redis, keys: Keys) -> None:
    now = time.time()
    seed_dead_letters(redis_client, keys, now)
    redis_client.xadd(keys.dead_letters, {FIELD: b"not json"})  # skipped, not fatal
    before = redis_client.xlen(keys.dead_letters)
    recent = letters.read_dead_letters(redis_client, keys, since=now - 900, limit=100)
    assert recent.total == 7
    assert [letter.error for letter in recent.letters] == [DEAD_ERRORS["w2"], DEAD_ERRORS["w1"]]
    everything = letters.read_dead_letters(redis_client, keys, since=None, limit=100)
    assert [letter.error for letter in everything.letters][-1] == "old failure"
    # limit bounds the entries read: the newest one is the bad one.
    assert len(letters.read_dead_letters(redis_client, keys, None, limit=1).letters) == 0
    assert redis_client.xlen(keys.dead_letters) == before  # nothing read is removed


def test_nothing_recorded_yet(redis_client: redis.Redis, keys: Keys) -> None:
    empty = letters.read_dead_letters(redis_client, keys, since=None, limit=10)
    assert empty == letters.DeadLetters([], 0)
    assert not redis_client.exists(keys.dead_letters, keys.dead_letter_count)  # read-only


def test_table_filters_workers(redis_client: redis.Redis, keys: Keys) -> None:
    seed_dead_letters(redis_client, keys, time.time())
    found = letters.read_dead_letters(redis_client, keys, since=None, limit=10).letters
    table = letters.dead_letters_table(found)
    assert list(table.columns) == letters.COLUMNS
    assert list(table["worker"]) == ["w2", "w1", "w1"]
    assert set(table["deliveries"]) == {3} and set(table["prompt"]) == {"Once upon a time"}
    only_w2 = letters.dead_letters_table(found, workers=("w2",))
    assert list(only_w2["error"]) == [DEAD_ERRORS["w2"]]
    assert letters.dead_letters_table([]).empty


def test_unreachable_redis_raises_quickly() -> None:
    client = letters.client_for("redis://127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(redis.RedisError):
        letters.read_dead_letters(client, Keys("nowhere"), since=None, limit=10)
