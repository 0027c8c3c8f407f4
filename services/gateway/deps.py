"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from dataclasses import dataclass
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


async def require_model(state: StateDep) -> ServedModel:
    """The served model; 503 while no worker has published one."""
    return await _served(state)


async def _served(state: GatewayState) -> ServedModel:
    model = await state.catalog.current()
    if model is None:
        error = no_model()
        if state.catalog.last_error:
            error = ApiError(
                503, state.catalog.last_error, "service_unavailable", code="model_unusable"
            )
        raise error
    return model


@dataclass(frozen=True)
class Serving:
    """What a generation route needs: the app's state and the served model."""

    state: GatewayState
    model: ServedModel

    @property
    def settings(self) -> GatewaySettings:
        return self.state.settings

    @property
    def generator(self) -> Generator:
        return self.state.generator


async def require_serving(request: Request) -> Serving:
    """The state and the served model (503 while none), as one dependency: FastAPI
    resolves every dependency with a pass over the request's parameters, which the
    generation routes, the hot path, would otherwise pay four times."""
    state: GatewayState = request.app.state.gateway
    return Serving(state, await _served(state))


ModelDep = Annotated[ServedModel, Depends(require_model)]
ServingDep = Annotated[Serving, Depends(require_serving)]
