"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.gateway.catalog import ServedModel
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError, no_model
from services.gateway.generation import Generator
from services.gateway.state import GatewayState


# Dependencies are ``async``: FastAPI runs a plain ``def`` one in a worker thread, a
# thread hop per dependency and request for what is an attribute read.
async def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


async def get_settings(state: StateDep) -> GatewaySettings:
    return state.settings


async def get_generator(state: StateDep) -> Generator:
    return state.generator


async def require_model(state: StateDep) -> ServedModel:
    """The served model; 503 while no worker has published one."""
    model = await state.catalog.current()
    if model is None:
        error = no_model()
        if state.catalog.last_error:
            error = ApiError(
                503, state.catalog.last_error, "service_unavailable", code="model_unusable"
            )
        raise error
    return model


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
GeneratorDep = Annotated[Generator, Depends(get_generator)]
ModelDep = Annotated[ServedModel, Depends(require_model)]
