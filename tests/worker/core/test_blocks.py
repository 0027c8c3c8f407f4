"""The KV block pool: no block handed out twice, none lost, usage follows what is held."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.worker.core.blocks import BlockPool, BlockPoolError, blocks_for


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=60))
def test_no_block_is_used_twice_and_none_leaks(ops: list[tuple[bool, int]]) -> None:
    pool = BlockPool(num_blocks=24, block_size=4)
    held: list[list[int]] = []
    for allocate, n in ops:
        if allocate and pool.can_allocate(n):
            held.append(pool.allocate(n))
        elif held:
            pool.free(held.pop(n % len(held)))
        in_use = [b for blocks in held for b in blocks]
        assert len(in_use) == len(set(in_use)) == pool.num_used
        assert pool.num_used + pool.num_free == 24
        assert pool.usage() == pytest.approx(len(in_use) / 24)
    for blocks in held:
        pool.free(blocks)
    assert pool.num_free == 24 and pool.num_used == 0


def test_freeing_twice_or_a_foreign_block_is_an_error() -> None:
    pool = BlockPool(4, 16)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(BlockPoolError):
        pool.free(blocks)
    with pytest.raises(BlockPoolError):
        pool.free([99])
    with pytest.raises(BlockPoolError):
        pool.allocate(5)


def test_grow_table_takes_only_the_missing_blocks() -> None:
    pool = BlockPool(4, 8)
    table: list[int] = []
    assert pool.grow_table(table, 9) and len(table) == 2
    assert pool.grow_table(table, 16) and len(table) == 2
    assert pool.grow_table(table, 17) and len(table) == 3
    assert not pool.grow_table(table, 40) and len(table) == 3  # unchanged when short
