"""``/v1/predictions`` (PredictionService.ReportPredictionFeedback): the true label of an image predicted before."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from service.calls import Calls
from service.http.deps import calls
from service.http.errors import COMMON_ERRORS, error_responses
from service.monitoring import PREDICTION_ID_PATTERN
from service.resources import PredictionFeedback
from service.store.observations import MAX_LABEL_CHARS

router = APIRouter(prefix="/v1/predictions", tags=["predict"], responses=error_responses(*COMMON_ERRORS))

PredictionId = Annotated[
    str, Path(pattern=PREDICTION_ID_PATTERN, description="the prediction_id a prediction answered with")
]


class FeedbackLabel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=MAX_LABEL_CHARS, description="the true label of the image")


@router.post("/{prediction_id}:feedback", response_model=PredictionFeedback, responses=error_responses(404, 409))
async def report_feedback(
    prediction_id: PredictionId, body: FeedbackLabel, api: Calls = Depends(calls)
) -> PredictionFeedback:
    """Report the true label of an image predicted within GRAFT_PREDICTION_TTL_S: each head version that answered
    it (and its shadow) is counted right or wrong, for live accuracy. Once per prediction (409 after); 404 for an
    unknown, expired or another tenant's id; 400 for a label that is not a class of the heads that predicted."""
    return await api.report_feedback(prediction_id, body.label)
