"""``/v1/predict`` (PredictionService.Predict): images x heads -> top-k labels per image per head.

Two encodings of the same request: JSON with base64 images, or multipart file
uploads (handy with curl). Both end in the one ``Calls.predict``.
"""

import asyncio
import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import ConfigDict, Field, StringConstraints

from service.calls import Calls
from service.config import Settings
from service.errors import InvalidArgument
from service.http.deps import calls
from service.http.errors import COMMON_ERRORS, error_responses
from service.prediction_options import PredictOptions
from service.resources import HEAD_REF_PATTERN, PredictResponse

router = APIRouter(prefix="/v1", tags=["predict"], responses=error_responses(*COMMON_ERRORS, 404, 409, 429, 504))

HeadRef = Annotated[str, StringConstraints(pattern=HEAD_REF_PATTERN)]
Base64 = Annotated[str, StringConstraints(pattern=r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")]
# The schema states the default limits; GRAFT_MAX_IMAGES_PER_REQUEST and GRAFT_MAX_HEADS_PER_REQUEST change them.
MAX_IMAGES = Settings.model_fields["max_images_per_request"].default
MAX_HEADS = Settings.model_fields["max_heads_per_request"].default


class PredictRequest(PredictOptions):
    model_config = ConfigDict(extra="forbid")

    images: list[Base64] = Field(
        min_length=1, max_length=MAX_IMAGES, description="base64-encoded image files (JPEG, PNG, WebP, BMP, GIF)"
    )
    heads: list[HeadRef] = Field(
        min_length=1, max_length=MAX_HEADS, description="head references: 'name', 'name@3' or 'name:prod'"
    )


def _coverage_never_null(schema: dict) -> None:
    """A form field is never null (a client that sent "null" would be refused): `coverage` is stated as the number
    it is when sent; leaving it out asks for no prediction set."""
    coverage = schema["properties"]["coverage"]
    coverage.update(next(branch for branch in coverage.pop("anyOf") if branch.get("type") != "null"))
    coverage.pop("default", None)


class PredictForm(PredictOptions):
    """The options as multipart form fields, beside the files and heads."""

    model_config = ConfigDict(json_schema_extra=_coverage_never_null)


def _decode(index: int, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"images[{index}] is not valid base64") from None


def _decode_all(texts: list[str]) -> list[bytes]:
    return [_decode(i, text) for i, text in enumerate(texts)]


@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, api: Calls = Depends(calls)) -> PredictResponse:
    images = await asyncio.to_thread(_decode_all, body.images)  # up to GRAFT_MAX_JSON_BYTES: not on the loop
    out = await api.predict(images, body.heads, body, door="http")
    return PredictResponse(predictions=out)


@router.post("/predict:upload", response_model=PredictResponse)
async def predict_upload(
    files: Annotated[list[UploadFile], File(min_length=1, max_length=MAX_IMAGES, description="image files")],
    heads: Annotated[
        list[HeadRef],
        Form(min_length=1, max_length=MAX_HEADS, description="head references; repeat the field per head"),
    ],
    options: Annotated[PredictForm, Form()],
    api: Calls = Depends(calls),
) -> PredictResponse:
    images = [await upload.read() for upload in files]
    out = await api.predict(images, heads, options, door="http")
    return PredictResponse(predictions=out)
