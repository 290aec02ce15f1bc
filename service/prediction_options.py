"""What a prediction asks of every head, stated once: each option's type, bounds, default and meaning.

Both doors read a request into this model (the JSON body, the multipart form, the gRPC
messages: service/grpc/convert.py:predict_options), ``Calls.predict`` passes it on and
the predictor answers by it, so an option added here reaches every door. The client
keeps a copy (client/models.py); tests/unit/test_prediction_options.py holds the copy,
the protos and the OpenAPI document to this one.
"""

from pydantic import BaseModel, ConfigDict, Field


class PredictOptions(BaseModel):
    """What a request asks of each head's scores. Frozen: one default instance serves every call that asks nothing."""

    # No extra="forbid": the multipart form carries the images and heads beside these fields.
    model_config = ConfigDict(frozen=True)

    top_k: int = Field(5, ge=1, le=1000, description="how many labels each head answers, best first")
    include_embedding: bool = Field(False, description="also return the pooled backbone features")
    min_score: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="a head whose top (calibrated) score is below this answers `abstained: true`; 0 never abstains",
    )
    include_shadow: bool = Field(
        False,
        description="also return each head's shadow version's own prediction (`shadow`, null where the head has "
        "none); the shadow is scored either way",
    )
    coverage: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="add each head's `prediction_set`: the labels that contain the true one with this probability",
    )


DEFAULT_OPTIONS = PredictOptions()
