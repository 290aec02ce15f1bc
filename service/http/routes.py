"""HTTP resources of graft (``/v1``). Handlers parse, call the core, and return its models."""

import bentoml
from fastapi import APIRouter, Depends, FastAPI

from service.core import Core
from service.engine.backbones import BackboneInfo
from service.http.errors import install_error_handlers
from service.errors import NotFound


def current_core() -> Core:
    """The core owned by this worker's service instance."""
    return bentoml.get_current_service().core


router = APIRouter(prefix="/v1")


@router.get("/backbones", response_model=list[BackboneInfo], tags=["backbones"])
def list_backbones(core: Core = Depends(current_core)) -> list[BackboneInfo]:
    return [backbone.info() for backbone in core.backbones.values()]


@router.get("/backbones/{name}", response_model=BackboneInfo, tags=["backbones"])
def get_backbone(name: str, core: Core = Depends(current_core)) -> BackboneInfo:
    if name not in core.backbones:
        raise NotFound(f"backbone '{name}' is not loaded; loaded: {', '.join(sorted(core.backbones))}")
    return core.backbones[name].info()


def create_app() -> FastAPI:
    app = FastAPI(title="graft", version="1", description="Transfer learning as a service.")
    app.include_router(router)
    install_error_handlers(app)
    return app
