"""``/v1/backbones``: what the service can train heads on."""

from fastapi import APIRouter, Depends

from service.engine.backbones import BackboneInfo
from service.http.deps import runtime, tenant
from service.runtime import Runtime

router = APIRouter(prefix="/v1/backbones", tags=["backbones"], dependencies=[Depends(tenant)])


@router.get("", response_model=list[BackboneInfo])
def list_backbones(rt: Runtime = Depends(runtime)) -> list[BackboneInfo]:
    return [backbone.info() for backbone in rt.core.backbones.values()]


@router.get("/{name}", response_model=BackboneInfo)
def get_backbone(name: str, rt: Runtime = Depends(runtime)) -> BackboneInfo:
    return rt.core.backbone_info(name)
