"""graft.v1 messages <-> the contract's resources (service/resources.py), which the HTTP door sends as JSON.

Messages are built from the resources' own field names: a field one side has and
the other lacks fails at once, so the doors cannot drift apart. Only the enums
differ in spelling (``linear`` <-> ``HEAD_KIND_LINEAR``, ``queued`` <-> ``QUEUED``,
``standardise`` <-> ``FEATURE_SCALING_STANDARDISE``).
"""

from enum import Enum
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError

from adapters.active import Strategy
from adapters.kinds import HeadKind
from adapters.recipe import ClassWeighting, Objective, Scaling
from service.batch.results import ResultsFormat
from service.engine.predictor import ImagePrediction
from service.errors import InvalidArgument
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.jobs import JobState
from service.prediction_options import PredictOptions
from service.resources import (
    BatchPredictionSpec,
    CompareHeadVersionsResponse,
    CreateWebhookRequest,
    ExportFormat,
    TrainingKind,
    TrainingSpec,
)
from service.store.windows import DriftStatus
from service.webhooks.outbox import DeliveryState

M = TypeVar("M", bound=Message)

_ENUM_PREFIX: dict[type[Enum], str] = {
    HeadKind: "HEAD_KIND_",
    TrainingKind: "HEAD_KIND_",
    JobState: "",
    Objective: "OBJECTIVE_",
    ClassWeighting: "CLASS_WEIGHTING_",
    Scaling: "FEATURE_SCALING_",
    DriftStatus: "DRIFT_STATUS_",
    Strategy: "SUGGESTION_STRATEGY_",
    DeliveryState: "",
}
# TrainingSpec's enumerated fields: the resource's enum, what a refusal calls it, and the proto enum's values.
_SPEC_ENUMS: dict[str, tuple[type[Enum], str, list[str]]] = {
    "kind": (TrainingKind, "head kind", pb.HeadKind.keys()),
    "objective": (Objective, "objective", pb.Objective.keys()),
    "class_weighting": (ClassWeighting, "class weighting", pb.ClassWeighting.keys()),
    "scaling": (Scaling, "feature scaling", pb.FeatureScaling.keys()),
}
EXPORT_FORMATS = {
    api.EXPORT_FORMAT_UNSPECIFIED: ExportFormat.SAFETENSORS,
    api.EXPORT_FORMAT_SAFETENSORS: ExportFormat.SAFETENSORS,
    api.EXPORT_FORMAT_ONNX: ExportFormat.ONNX,
    api.EXPORT_FORMAT_PT2: ExportFormat.PT2,
}
RESULTS_FORMATS = {
    api.BATCH_RESULTS_FORMAT_UNSPECIFIED: ResultsFormat.JSONL,
    api.BATCH_RESULTS_FORMAT_JSONL: ResultsFormat.JSONL,
    api.BATCH_RESULTS_FORMAT_CSV: ResultsFormat.CSV,
}
# Reserved in the proto; a client built on an older graft.v1 may still send it.
REMOVED_EXPORT_FORMATS = {
    2: "EXPORT_FORMAT_TORCHSCRIPT (2) was removed (torch 2.14 deprecates TorchScript); use "
    "EXPORT_FORMAT_PT2 (torch.export, load with torch.export.load) or EXPORT_FORMAT_ONNX"
}


def message(resource: BaseModel, cls: type[M]) -> M:
    """The message ``cls`` with the resource's fields (unset ones left at their proto defaults)."""
    return cls(**_proto_values(resource.model_dump(exclude_none=True)))


def _proto_values(value: Any) -> Any:
    if isinstance(value, Enum) and type(value) in _ENUM_PREFIX:
        return _ENUM_PREFIX[type(value)] + value.value.upper()
    if isinstance(value, dict):
        return {key: _proto_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_proto_values(item) for item in value]
    return value


def training_spec(spec: pb.TrainingSpec) -> TrainingSpec:
    """A TrainingSpec message as the resource: fields it does not set take the service's defaults."""
    fields = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    for field, (enum, what, proto_names) in _SPEC_ENUMS.items():
        # UNSPECIFIED (left out by MessageToDict) takes the service's default; a number with no name is a newer
        # client's value, refused as this server cannot honour it
        value = fields.pop(field, None)
        if value in (None, f"{_ENUM_PREFIX[enum]}UNSPECIFIED"):
            continue
        known = {f"{_ENUM_PREFIX[enum]}{member.value.upper()}": member.value for member in enum}
        if value not in known:
            raise InvalidArgument(
                f"{field} {value} is not a known {what}; use one of "
                f"{', '.join(name for name in proto_names if not name.endswith('_UNSPECIFIED'))}"
            )
        fields[field] = known[value]
    return TrainingSpec.model_validate(fields)


def export_format(value: api.ExportFormat) -> ExportFormat:
    if value in REMOVED_EXPORT_FORMATS:
        raise InvalidArgument(REMOVED_EXPORT_FORMATS[value])
    if value not in EXPORT_FORMATS:
        raise InvalidArgument(
            f"format {value} is not a known export format; use one of {', '.join(api.ExportFormat.keys()[1:])}"
        )
    return EXPORT_FORMATS[value]


def suggestion_strategy(value: int) -> Strategy | None:
    """A SuggestionStrategy number as the resource's enum; UNSPECIFIED (None) takes the server's default."""
    if value == api.SUGGESTION_STRATEGY_UNSPECIFIED:
        return None
    if value not in api.SuggestionStrategy.values():
        raise InvalidArgument(
            f"strategy {value} is not a known suggestion strategy; use one of "
            f"{', '.join(api.SuggestionStrategy.keys()[1:])}"
        )
    return Strategy(api.SuggestionStrategy.Name(value).removeprefix("SUGGESTION_STRATEGY_").lower())


def results_format(value: api.BatchResultsFormat) -> ResultsFormat:
    if value not in RESULTS_FORMATS:
        raise InvalidArgument(
            f"format {value} is not a known results format; use one of {', '.join(api.BatchResultsFormat.keys()[1:])}"
        )
    return RESULTS_FORMATS[value]


def batch_prediction_spec(spec: pb.BatchPredictionSpec) -> BatchPredictionSpec:
    """A BatchPredictionSpec message as the resource; top_k 0 (unset in proto3) takes the default."""
    fields = {"dataset": spec.dataset, "heads": list(spec.heads), "min_score": spec.min_score}
    return BatchPredictionSpec.model_validate(fields | ({"top_k": spec.top_k} if spec.top_k else {}))


def predict_options(request: api.PredictRequest | api.StreamPredictRequest) -> PredictOptions:
    """The options of a Predict or StreamPredict message, field by field of the model. proto3 cannot tell an unset
    field from zero, so an option at zero (top_k 0, coverage 0) takes the model's default, as when HTTP omits it."""
    given = {name: getattr(request, name) for name in PredictOptions.model_fields}
    return PredictOptions(**{name: value for name, value in given.items() if value})


def image_prediction(prediction: ImagePrediction) -> api.ImagePrediction:
    return message(prediction, api.ImagePrediction)


def comparisons(response: CompareHeadVersionsResponse) -> api.CompareHeadVersionsResponse:
    """The one resource with a matrix: proto3 has no repeated repeated, so each row is a ConfusionRow."""
    fields = response.model_dump(exclude_none=True)
    for comparison in fields["comparisons"]:
        comparison["confusion"] = [{"counts": row} for row in comparison["confusion"]]
    return api.CompareHeadVersionsResponse(**fields)


def create_webhook_request(request: api.CreateWebhookRequest) -> CreateWebhookRequest:
    """The request's fields, bounded as the HTTP door bounds its body."""
    try:
        return CreateWebhookRequest(
            url=request.url, event_types=list(request.event_types), description=request.description
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        raise InvalidArgument(f"{field}: {error['msg']}") from None
