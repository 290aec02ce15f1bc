"""``/v1/heads`` (HeadService): trained heads with versions and aliases; export as safetensors, ONNX or .pt2."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, BeforeValidator, StringConstraints

from service.calls import Calls
from service.export import MAX_HEADS
from service.http.deps import PageSize, PageToken, calls
from service.http.errors import COMMON_ERRORS, error_responses
from service.http.routing import ResourceRoute
from service.resources import (
    ALIAS_PATTERN,
    DEFAULT_PAGE_SIZE,
    HEAD_NAME_PATTERN,
    MAX_VERSION,
    NOT_LATEST,
    REMOVED_EXPORT_FORMATS,
    STORED_HEAD_REF_PATTERN,
    CompareHeadVersionsResponse,
    ExportFormat,
    Head,
    HeadMonitoring,
    HeadVersion,
    ListHeadsResponse,
    Version,
)

router = APIRouter(
    prefix="/v1/heads", tags=["heads"], route_class=ResourceRoute, responses=error_responses(*COMMON_ERRORS)
)

HeadName = Annotated[str, Path(pattern=HEAD_NAME_PATTERN, description="the head in heads/{head}")]
Alias = Annotated[
    str,
    Path(
        pattern=ALIAS_PATTERN, json_schema_extra=NOT_LATEST, description="an alias; 'latest' is implicit and reserved"
    ),
]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_VERSION, description="the version in heads/{head}/versions/{version}")]
HeadRef = Annotated[str, Path(pattern=STORED_HEAD_REF_PATTERN, description="'name' (latest), 'name@3' or 'name:alias'")]


class AliasTarget(BaseModel):
    version: Version


class ShadowTarget(BaseModel):
    version: Version


@router.get("", response_model=ListHeadsResponse)
async def list_heads(
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = "",
    api: Calls = Depends(calls),
) -> ListHeadsResponse:
    return await api.list_heads(page_size, page_token)


def _not_removed(value: object) -> object:
    """A removed format gets what to use instead, not just the list of valid ones."""
    if isinstance(value, str) and value in REMOVED_EXPORT_FORMATS:
        raise ValueError(REMOVED_EXPORT_FORMATS[value])
    return value


Format = Annotated[
    ExportFormat,
    BeforeValidator(_not_removed),
    Query(
        description="safetensors: the head's weights; onnx or pt2: backbone + head(s) in one file, "
        "class probabilities out, class names, input transforms and provenance in its metadata"
    ),
]
AdditionalHeads = Annotated[
    list[Annotated[str, StringConstraints(pattern=STORED_HEAD_REF_PATTERN)]],
    Query(max_length=MAX_HEADS - 1, description="onnx and pt2: more heads on the same backbone, one more output each"),
]


# Declared before /{head}: a path like 'name@2:export' would match that route too.
@router.get(
    "/{head}:export",
    response_class=Response,
    responses=error_responses(404, 429) | {200: {"content": {"application/octet-stream": {}}}},
)
async def export_head(
    head: HeadRef,
    format: Format = ExportFormat.SAFETENSORS,
    additional_heads: AdditionalHeads = [],  # noqa: B006 (FastAPI copies defaults)
    api: Calls = Depends(calls),
) -> Response:
    """Download a head: its safetensors weights, or one ONNX / torch.export (.pt2) file of backbone + head(s)
    that runs without graft, checked against graft's own PyTorch on the heads' images before it is returned."""
    exported = await api.export_head(head, format, additional_heads)
    return Response(
        exported.data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{exported.file_name}"'},
    )


# Declared before /{head}, as :export is.
@router.put("/{head}:shadow", response_model=Head, responses=error_responses(404, 409))
async def set_shadow(head: HeadName, target: ShadowTarget, api: Calls = Depends(calls)) -> Head:
    """Score ``version`` beside every prediction of this head (same batch, no second trunk pass) and compare the
    two (``GET :compare``); predictions return its answer only with ``include_shadow``. Idempotent."""
    return await api.set_shadow(head, target.version)


@router.delete("/{head}:shadow", response_model=Head, responses=error_responses(404, 409))
async def clear_shadow(head: HeadName, api: Calls = Depends(calls)) -> Head:
    """Stop scoring the shadow; its comparison figures are kept."""
    return await api.clear_shadow(head)


@router.get("/{head}:compare", response_model=CompareHeadVersionsResponse, responses=error_responses(404))
async def compare_head_versions(head: HeadName, api: Calls = Depends(calls)) -> CompareHeadVersionsResponse:
    """Per (served version, shadow version): images compared, top-1 agreement, the label confusion table, the mean
    top-score difference and, from feedback, both versions' accuracy; over every replica."""
    return await api.compare_head_versions(head)


@router.get("/{head}:monitor", response_model=HeadMonitoring, responses=error_responses(404))
async def get_head_monitoring(head: HeadName, api: Calls = Depends(calls)) -> HeadMonitoring:
    """The monitoring of the version the head serves by default (its latest): as for a version's ``:monitor``."""
    return await api.head_monitoring(head)


@router.get("/{head}/versions/{version}:monitor", response_model=HeadMonitoring, responses=error_responses(404))
async def get_head_version_monitoring(
    head: HeadName, version: VersionNumber, api: Calls = Depends(calls)
) -> HeadMonitoring:
    """The version's drift status and its traffic per window (labels, confidences, abstentions, OOD rate, drift
    test), every replica's, oldest first; this replica's full windows are written first."""
    return await api.head_monitoring(f"heads/{head}/versions/{version}")


@router.post("/{head}/versions/{version}:clearDrift", response_model=HeadMonitoring, responses=error_responses(404))
async def clear_head_drift(head: HeadName, version: VersionNumber, api: Calls = Depends(calls)) -> HeadMonitoring:
    """Set the version's status back to 'ok' (the traffic was looked at and accepted); the next drifting window
    marks it again."""
    return await api.clear_head_drift(f"heads/{head}/versions/{version}")


@router.get("/{head}", response_model=Head, responses=error_responses(404))
async def get_head(head: HeadName, api: Calls = Depends(calls)) -> Head:
    """The head with its versions and aliases; each version's ``metrics`` is its summary (accuracy, ECE, ...)."""
    return await api.get_head(head)


@router.get("/{head}/versions/{version}", response_model=HeadVersion, responses=error_responses(404))
async def get_head_version(head: HeadName, version: VersionNumber, api: Calls = Depends(calls)) -> HeadVersion:
    """One version with its whole metrics (per class, confusion matrix, calibration, trials) and its aliases."""
    return await api.get_head_version(f"heads/{head}/versions/{version}")


@router.delete("/{head}", status_code=204, response_class=Response, responses=error_responses(404, 409))
async def delete_head(head: HeadName, api: Calls = Depends(calls)) -> Response:
    await api.delete_head(head)
    return Response(status_code=204)


@router.delete(
    "/{head}/versions/{version}", status_code=204, response_class=Response, responses=error_responses(404, 409)
)
async def delete_head_version(head: HeadName, version: VersionNumber, api: Calls = Depends(calls)) -> Response:
    await api.delete_head_version(f"heads/{head}/versions/{version}")
    return Response(status_code=204)


@router.put("/{head}/aliases/{alias}", response_model=Head, responses=error_responses(404, 409))
async def set_alias(head: HeadName, alias: Alias, target: AliasTarget, api: Calls = Depends(calls)) -> Head:
    """Point ``alias`` (e.g. ``prod``) at a version; predictions by ``name:alias`` follow at once. Answers the head
    as ``GET /v1/heads/{head}`` does."""
    return await api.set_alias(head, alias, target.version)


@router.delete("/{head}/aliases/{alias}", status_code=204, response_class=Response, responses=error_responses(404, 409))
async def remove_alias(head: HeadName, alias: Alias, api: Calls = Depends(calls)) -> Response:
    await api.remove_alias(head, alias)
    return Response(status_code=204)
