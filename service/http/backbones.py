"""``/v1/backbones``: what the service can train heads on (BackboneService)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from service.calls import Calls
from service.http.deps import calls
from service.http.errors import COMMON_ERRORS, error_responses
from service.resources import ID_PATTERN, Backbone, ListBackbonesResponse

router = APIRouter(prefix="/v1/backbones", tags=["backbones"], responses=error_responses(*COMMON_ERRORS))


@router.get("", response_model=ListBackbonesResponse)
def list_backbones(api: Calls = Depends(calls)) -> ListBackbonesResponse:
    return api.list_backbones()


@router.get("/{backbone}", response_model=Backbone, responses=error_responses(404))
def get_backbone(backbone: Annotated[str, Path(pattern=ID_PATTERN)], api: Calls = Depends(calls)) -> Backbone:
    return api.get_backbone(backbone)
