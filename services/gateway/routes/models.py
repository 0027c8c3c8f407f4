"""The model list."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.deps import StateDep
from services.gateway.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
async def list_models(state: StateDep) -> ModelList:
    """The model served by the workers (an empty list while none is loaded)."""
    model = await state.catalog.current()
    if model is None:
        return ModelList(data=[])
    card = ModelCard(
        id=model.served_name,
        created=int(model.loaded_at),
        synthetic=model.info.synthetic,
        context_length=model.info.context_length,
    )
    return ModelList(data=[card])
