"""``/v1/predict``: images x heads -> top-k labels per image per head.

Two encodings of the same request: JSON with base64 images, or multipart file
uploads (handy with curl). Both end in the engine's one predict call.
"""

import asyncio
import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BaseModel, Field, StringConstraints

from service.engine.predictor import ImagePrediction
from service.errors import InvalidArgument
from service.http.deps import runtime, tenant
from service.runtime import Runtime

router = APIRouter(prefix="/v1", tags=["predict"])


# A head reference is short and printable (PostgreSQL refuses NUL in text; names never hold control characters).
HeadRef = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")]


class PredictRequest(BaseModel):
    images: list[str] = Field(description="base64-encoded image files (JPEG, PNG, WebP, BMP, GIF)")
    heads: list[HeadRef] = Field(description="head references: 'name', 'name@3' or 'name:prod'")
    top_k: int = 5
    embedding: bool = Field(False, description="also return the pooled backbone features")


class PredictResponse(BaseModel):
    predictions: list[ImagePrediction]


def _decode(index: int, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"images[{index}] is not valid base64") from None


def _decode_all(texts: list[str]) -> list[bytes]:
    return [_decode(i, text) for i, text in enumerate(texts)]


@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> PredictResponse:
    images = await asyncio.to_thread(_decode_all, body.images)  # up to GRAFT_MAX_REQUEST_BYTES: not on the loop
    out = await rt.predictor.predict(who, images, body.heads, top_k=body.top_k, embedding=body.embedding, door="http")
    return PredictResponse(predictions=out)


@router.post("/predict:upload", response_model=PredictResponse)
async def predict_upload(
    files: list[UploadFile] = File(..., description="image files"),
    heads: list[HeadRef] = Form(..., description="head references; repeat the field for several heads"),
    top_k: int = Form(5),
    embedding: bool = Form(False),
    rt: Runtime = Depends(runtime),
    who: str = Depends(tenant),
) -> PredictResponse:
    images = [await upload.read() for upload in files]
    out = await rt.predictor.predict(who, images, heads, top_k=top_k, embedding=embedding, door="http")
    return PredictResponse(predictions=out)
