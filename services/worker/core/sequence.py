"""One request in flight: its token ids, how many of them the KV cache holds, its blocks.

The text side (decoding, stop strings, held-back streaming text, finish reasons) is the
:class:`~services.worker.rows.Row` the batch engine uses too; a sequence adds what
continuous batching needs: the block table and ``num_computed`` (tokens whose keys and
values are in the cache). A preempted sequence keeps its generated tokens and is
recomputed later from ``token_ids`` (prompt + generated), so its text stays valid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

from services.worker.rows import Row

_arrivals = itertools.count()


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request's tokens and cache state. ``row`` holds its text and finish state."""

    row: Row
    prompt_ids: list[int]
    max_tokens: int
    arrival: int = field(default_factory=lambda: next(_arrivals))
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    preemptions: int = 0
    added_at: float = 0.0  # monotonic seconds, for admission time-outs
    last_token_at: float | None = None  # wall clock of the newest token (inter-token latency)

    @property
    def request_id(self) -> str:
        return self.row.request.id

    @property
    def generated(self) -> list[int]:
        return self.row.tokens

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens (EOS is not kept: it ends the sequence)."""
        return len(self.prompt_ids) + len(self.row.tokens)

    @property
    def total_len(self) -> int:
        """The longest this sequence can get: prompt + ``max_tokens``."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.row.finished

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``start..end`` of prompt + generated."""
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[start:end]
        head = self.prompt_ids[start:] if start < prompt else []
        return head + self.row.tokens[max(0, start - prompt) : end - prompt]
