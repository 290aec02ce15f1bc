"""``/v1/batchPredictions`` (BatchPredictionService): heads x a stored dataset, run in the background; poll it,
then download its results as JSON Lines or CSV."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import StreamingResponse

from service.batch.results import ResultsFormat
from service.calls import Calls
from service.http.deps import IdempotencyKey, PageSize, PageToken, calls
from service.http.errors import COMMON_ERRORS, error_responses
from service.http.routing import ResourceRoute
from service.resources import (
    DEFAULT_PAGE_SIZE,
    ID_PATTERN,
    BatchPrediction,
    BatchPredictionSpec,
    ListBatchPredictionsResponse,
)

router = APIRouter(
    prefix="/v1/batchPredictions",
    tags=["batch predictions"],
    route_class=ResourceRoute,
    responses=error_responses(*COMMON_ERRORS),
)

BatchId = Annotated[str, Path(pattern=ID_PATTERN, description="the id in batchPredictions/{batch_prediction}")]
Format = Annotated[ResultsFormat, Query(description="jsonl: one JSON object per example; csv: one row per example")]


@router.post("", response_model=BatchPrediction, status_code=202, responses=error_responses(404, 409, 429))
async def create_batch_prediction(
    spec: BatchPredictionSpec, idempotency_key: IdempotencyKey = None, api: Calls = Depends(calls)
) -> BatchPrediction:
    """Queue heads x every example of a dataset; it returns at once with state ``queued``. The heads are pinned
    to the versions they name now. With an ``Idempotency-Key``, a repeat of the same spec answers the same one."""
    return await api.create_batch_prediction(spec, idempotency_key)


@router.get("", response_model=ListBatchPredictionsResponse)
async def list_batch_predictions(
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = "",
    api: Calls = Depends(calls),
) -> ListBatchPredictionsResponse:
    return await api.list_batch_predictions(page_size, page_token)


@router.post("/{batch_prediction}:cancel", response_model=BatchPrediction, responses=error_responses(404, 409))
async def cancel_batch_prediction(batch_prediction: BatchId, api: Calls = Depends(calls)) -> BatchPrediction:
    """A queued one ends at once; a running one at its next chunk."""
    return await api.cancel_batch_prediction(batch_prediction)


@router.get(
    "/{batch_prediction}/results",
    response_class=StreamingResponse,
    responses=error_responses(404, 409)
    | {200: {"content": {ResultsFormat.JSONL.media_type: {}, ResultsFormat.CSV.media_type: {}}}},
)
async def get_batch_prediction_results(
    batch_prediction: BatchId, format: Format = ResultsFormat.JSONL, api: Calls = Depends(calls)
) -> StreamingResponse:
    """One row per example, in upload order: its index, file name, client id and sha256, and each head's
    version, label, score, abstention and top-k. Only once the batch prediction succeeded (409 before)."""
    pieces = await api.batch_prediction_results(batch_prediction, format)
    file_name = f"{batch_prediction}.{format.value}"
    return StreamingResponse(
        pieces,
        media_type=format.media_type,
        headers={"Content-Disposition": f'attachment; filename="{file_name}"'},
    )


@router.get("/{batch_prediction}", response_model=BatchPrediction, responses=error_responses(404))
async def get_batch_prediction(batch_prediction: BatchId, api: Calls = Depends(calls)) -> BatchPrediction:
    return await api.get_batch_prediction(batch_prediction)


@router.delete("/{batch_prediction}", status_code=204, response_class=Response, responses=error_responses(404, 409))
async def delete_batch_prediction(batch_prediction: BatchId, api: Calls = Depends(calls)) -> Response:
    """A finished one and its results; a queued or running one must be cancelled first (409)."""
    await api.delete_batch_prediction(batch_prediction)
    return Response(status_code=204)
