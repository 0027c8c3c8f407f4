"""Choosing the next batch from the waiting requests (pure: data in, data out).

A static batch costs as much as its longest row: every row is padded to the longest
prompt, and the KV cache holds ``rows x (longest prompt + most new tokens)`` tokens.
So a batch should hold prompts of similar length, and a long-prompt batch fewer rows.

:func:`select_batch` always takes the oldest waiting request (nothing starves), then
the requests closest to it in prompt length, while the batch stays within
``batch_size`` rows and ``max_batch_tokens`` padded tokens. A request alone over the
token budget still runs alone: the budget shapes batches, it never drops work.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.schemas import GenerationRequest


def row_cost(request: GenerationRequest, max_seq_len: int | None = None) -> tuple[int, int]:
    """(prompt tokens, new tokens) of one row, capped by ``max_seq_len`` as the engine does.

    (The engine's rule: a prompt of ``max_seq_len`` tokens or more keeps room for
    ``min(max_tokens, max_seq_len // 4)`` new ones; the budget then fits the rest.)
    """
    prompt = request.prompt_len
    new = request.params.max_tokens
    if max_seq_len is not None:
        if prompt >= max_seq_len:
            prompt = max_seq_len - min(new, max(1, max_seq_len // 4))
        new = min(new, max_seq_len - prompt)
    return prompt, new


def padded_tokens(costs: Sequence[tuple[int, int]]) -> int:
    """Tokens a static batch of these rows occupies: rows x (longest prompt + most new)."""
    if not costs:
        return 0
    return len(costs) * (max(p for p, _ in costs) + max(n for _, n in costs))


def select_batch(
    waiting: Sequence[GenerationRequest],
    batch_size: int,
    max_batch_tokens: int | None = None,
    max_seq_len: int | None = None,
) -> list[GenerationRequest]:
    """The next batch from ``waiting`` (oldest first), in the order given.

    Contract: the result is empty only when ``waiting`` is; it always holds
    ``waiting[0]``; it has at most ``batch_size`` rows; its :func:`padded_tokens`
    stay within ``max_batch_tokens`` unless it is the oldest request alone.
    """
    if not waiting:
        return []
    costs = [row_cost(r, max_seq_len) for r in waiting]
    anchor = costs[0][0]
    # Closest prompt length first; among equals the older one (lower index).
    order = sorted(range(1, len(waiting)), key=lambda i: (abs(costs[i][0] - anchor), i))
    chosen = [0]
    for i in order:
        if len(chosen) >= max(1, batch_size):
            break
        trial = [costs[j] for j in chosen] + [costs[i]]
        if max_batch_tokens is None or padded_tokens(trial) <= max_batch_tokens:
            chosen.append(i)
    return [waiting[i] for i in sorted(chosen)]


def padding_ratio(lengths: Sequence[int]) -> float:
    """Pad tokens / all tokens when these prompt lengths are left-padded to the longest."""
    if not lengths:
        return 0.0
    width = max(lengths)
    if width == 0:
        return 0.0
    return 1.0 - sum(lengths) / (width * len(lengths))
