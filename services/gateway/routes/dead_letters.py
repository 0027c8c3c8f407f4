"""Requests the workers gave up on (dead letters), newest first."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from services.gateway.deps import StateDep
from services.gateway.openapi import EDGE, errors
from services.gateway.schemas import DeadLetterList
from shared.replies import as_text
from shared.schemas import DeadLetter, load

router = APIRouter(prefix="/v1", tags=["operations"])


@router.get("/dead_letters", responses=errors(*EDGE))
async def list_dead_letters(
    state: StateDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> DeadLetterList:
    """Requests that failed too many deliveries (their clients got the error), newest first."""
    keys = state.keys
    entries: Any = await state.client.xrevrange(keys.dead_letters, count=limit)
    total = await state.client.get(keys.dead_letter_count)
    letters = [load(DeadLetter, fields[b"data"]) for _, fields in entries or []]
    return DeadLetterList(data=letters, total=int(as_text(total)) if total else 0)
