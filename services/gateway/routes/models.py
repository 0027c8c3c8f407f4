"""The model list, one model by name."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.catalog import ServedModel
from services.gateway.deps import StateDep
from services.gateway.errors import ApiError
from services.gateway.openapi import EDGE, errors
from services.gateway.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


def _card(model: ServedModel) -> ModelCard:
    # The context length the worker serves: prompt + completion must fit in it.
    return ModelCard(
        id=model.served_name,
        created=int(model.loaded_at),
        synthetic=model.info.synthetic,
        context_length=model.info.context_length,
    )


@router.get("/models", responses=errors(*EDGE))
async def list_models(state: StateDep) -> ModelList:
    """The model served by the workers (an empty list while none is loaded)."""
    model = await state.catalog.current()
    return ModelList(data=[] if model is None else [_card(model)])


@router.get("/models/{model_id:path}", responses=errors(*EDGE, 404))
async def retrieve_model(model_id: str, state: StateDep) -> ModelCard:
    """One model, by its id or one of its aliases; 404 ``model_not_found`` otherwise."""
    model = await state.catalog.current()
    known = model is not None and (
        model_id in model.names() or model_id in state.settings.model_aliases
    )
    if model is None or not known:
        raise ApiError(
            404, f"The model `{model_id}` does not exist", "invalid_request_error", "model",
            "model_not_found",
        )  # fmt: skip
    return _card(model)
