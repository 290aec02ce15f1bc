"""graft.v1 messages <-> the contract's resources (service/resources.py), which the HTTP door sends as JSON.

Messages are built from the resources' own field names: a field one side has and
the other lacks fails at once, so the doors cannot drift apart. Only the enums
differ in spelling (``linear`` <-> ``HEAD_KIND_LINEAR``, ``queued`` <-> ``QUEUED``).
"""

from enum import Enum
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel

from adapters.kinds import HeadKind
from service.engine.predictor import ImagePrediction
from service.errors import InvalidArgument
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.jobs import JobState
from service.prediction_options import PredictOptions
from service.resources import ExportFormat, TrainingKind, TrainingSpec

M = TypeVar("M", bound=Message)

_ENUM_PREFIX: dict[type[Enum], str] = {HeadKind: "HEAD_KIND_", TrainingKind: "HEAD_KIND_", JobState: ""}
EXPORT_FORMATS = {
    api.EXPORT_FORMAT_UNSPECIFIED: ExportFormat.SAFETENSORS,
    api.EXPORT_FORMAT_SAFETENSORS: ExportFormat.SAFETENSORS,
    api.EXPORT_FORMAT_ONNX: ExportFormat.ONNX,
    api.EXPORT_FORMAT_PT2: ExportFormat.PT2,
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
    kind = fields.pop("kind", "HEAD_KIND_UNSPECIFIED")
    if kind not in ("HEAD_KIND_UNSPECIFIED", *(f"HEAD_KIND_{k.value.upper()}" for k in TrainingKind)):
        raise InvalidArgument(f"kind {kind} is not a known head kind; use one of {', '.join(pb.HeadKind.keys()[1:])}")
    if kind != "HEAD_KIND_UNSPECIFIED":
        fields["kind"] = kind.removeprefix("HEAD_KIND_").lower()
    return TrainingSpec.model_validate(fields)


def export_format(value: api.ExportFormat) -> ExportFormat:
    if value in REMOVED_EXPORT_FORMATS:
        raise InvalidArgument(REMOVED_EXPORT_FORMATS[value])
    if value not in EXPORT_FORMATS:
        raise InvalidArgument(
            f"format {value} is not a known export format; use one of {', '.join(api.ExportFormat.keys()[1:])}"
        )
    return EXPORT_FORMATS[value]


def predict_options(request: api.PredictRequest | api.StreamPredictRequest) -> PredictOptions:
    """The options of a Predict or StreamPredict message, field by field of the model. proto3 cannot tell an unset
    field from zero, so an option at zero (top_k 0, coverage 0) takes the model's default, as when HTTP omits it."""
    given = {name: getattr(request, name) for name in PredictOptions.model_fields}
    return PredictOptions(**{name: value for name, value in given.items() if value})


def image_prediction(prediction: ImagePrediction) -> api.ImagePrediction:
    return message(prediction, api.ImagePrediction)
