"""``/v1/predict``: images x heads -> top-k labels per image per head.

Two encodings of the same request: JSON with base64 images, or multipart file
uploads (handy with curl). Both end in the engine's one predict call.
"""

import base64
import binascii

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BaseModel, Field

from service.engine.predictor import ImagePrediction
from service.errors import InvalidArgument
from service.http.deps import runtime, tenant
from service.runtime import Runtime

router = APIRouter(prefix="/v1", tags=["predict"])


class PredictRequest(BaseModel):
    images: list[str] = Field(description="base64-encoded image files (JPEG, PNG, WebP, BMP, GIF)")
    heads: list[str] = Field(description="head references: 'name', 'name@3' or 'name:prod'")
    top_k: int = 5
    embedding: bool = Field(False, description="also return the pooled backbone features")


class PredictResponse(BaseModel):
    predictions: list[ImagePrediction]


def _decode(index: int, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"images[{index}] is not valid base64") from None


@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> PredictResponse:
    images = [_decode(i, text) for i, text in enumerate(body.images)]
    out = await rt.predictor.predict(who, images, body.heads, top_k=body.top_k, embedding=body.embedding, door="http")
    return PredictResponse(predictions=out)


@router.post("/predict:upload", response_model=PredictResponse)
async def predict_upload(
    files: list[UploadFile] = File(..., description="image files"),
    heads: list[str] = Form(..., description="head references; repeat the field for several heads"),
    top_k: int = Form(5),
    embedding: bool = Form(False),
    rt: Runtime = Depends(runtime),
    who: str = Depends(tenant),
) -> PredictResponse:
    images = [await upload.read() for upload in files]
    out = await rt.predictor.predict(who, images, heads, top_k=top_k, embedding=embedding, door="http")
    return PredictResponse(predictions=out)
