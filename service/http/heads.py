"""``/v1/heads``: trained heads with versions and aliases; export as safetensors or TorchScript."""

from enum import Enum
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field

from service.export import export_torchscript
from service.http.deps import runtime, tenant
from service.runtime import Runtime
from service.store.heads import HeadInfo

router = APIRouter(prefix="/v1/heads", tags=["heads"])


class HeadList(BaseModel):
    heads: list[HeadInfo]
    next_page_token: str | None = None


MAX_VERSION = 2**31 - 1  # versions are numbered 1, 2, ... and stored as 32-bit integers

Version = Annotated[int, Path(ge=1, le=MAX_VERSION, description="a version number, 1 to 2^31-1")]


class AliasTarget(BaseModel):
    version: int = Field(ge=1, le=MAX_VERSION)


class ExportFormat(str, Enum):
    SAFETENSORS = "safetensors"
    TORCHSCRIPT = "torchscript"


@router.get("", response_model=HeadList)
def list_heads(
    page_size: int = Query(50, ge=1, le=1000),
    page_token: str | None = None,
    rt: Runtime = Depends(runtime),
    who: str = Depends(tenant),
) -> HeadList:
    heads, token = rt.core.heads.list(who, page_size, page_token)
    return HeadList(heads=heads, next_page_token=token)


# Declared before /{name}: a path like 'name@2:export' would match that route too.
@router.get("/{ref}:export", response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
def export_head(
    ref: str,
    format: ExportFormat = ExportFormat.SAFETENSORS,
    rt: Runtime = Depends(runtime),
    who: str = Depends(tenant),
) -> Response:
    """Download a head (``name``, ``name@3`` or ``name:prod``): its safetensors weights, or a
    standalone TorchScript model of backbone + head (probabilities out)."""
    info = rt.core.heads.resolve(who, ref)
    if format is ExportFormat.SAFETENSORS:
        body, suffix = rt.core.heads.head_blob_bytes(info), "safetensors"
    else:
        backbone = rt.core.trainer.backbone(info.backbone)
        body, suffix = export_torchscript(backbone, info, rt.core.heads.load_tensors(info)), "pt"
    filename = f"{info.name}-v{info.version}.{suffix}"
    return Response(body, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/{name}", response_model=HeadInfo)
def get_head(name: str, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> HeadInfo:
    return rt.core.heads.get(who, name)


@router.delete("/{name}", status_code=204)
def delete_head(name: str, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> Response:
    rt.core.heads.delete_head(who, name)
    return Response(status_code=204)


@router.delete("/{name}/versions/{version}", status_code=204)
def delete_head_version(name: str, version: Version, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> Response:
    rt.core.heads.delete_version(who, name, version)
    return Response(status_code=204)


@router.put("/{name}/aliases/{alias}", response_model=HeadInfo)
def set_alias(
    name: str, alias: str, target: AliasTarget, rt: Runtime = Depends(runtime), who: str = Depends(tenant)
) -> HeadInfo:
    """Point ``alias`` (e.g. ``prod``) at a version; predictions by ``name:alias`` follow at once."""
    rt.core.heads.set_alias(who, name, alias, target.version)
    return rt.core.heads.get(who, name)


@router.delete("/{name}/aliases/{alias}", status_code=204)
def remove_alias(name: str, alias: str, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> Response:
    rt.core.heads.remove_alias(who, name, alias)
    return Response(status_code=204)
