"""The KV block pool: no block handed out twice, none lost, usage follows what is held."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.worker.core.blocks import BlockPool, BlockPoolError, blocks_for, compaction


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


@given(
    st.lists(st.lists(st.integers(0, 63), max_size=6), max_size=8),
    st.integers(1, 64),
)
def test_compaction_brings_every_block_below_the_new_size(
    raw: list[list[int]], new_size: int
) -> None:
    seen: set[int] = set()
    tables = []
    for table in raw:  # disjoint tables, as the pool hands them out
        table = [b for b in dict.fromkeys(table) if b not in seen]
        seen.update(table)
        tables.append(table)
    moves = compaction(tables, new_size)
    if len(seen) > new_size:
        assert moves is None
        return
    assert moves is not None
    moved = [[moves.get(b, b) for b in table] for table in tables]
    flat = [b for table in moved for b in table]
    assert all(0 <= b < new_size for b in flat) and len(flat) == len(set(flat))
    assert all(old >= new_size > new for old, new in moves.items())
    pool = BlockPool.holding(new_size, 4, set(flat))
    assert pool.num_used == len(flat) and pool.num_free == new_size - len(flat)
    assert not set(pool.allocate(pool.num_free)) & set(flat)
