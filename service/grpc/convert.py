"""Core models <-> graft.v1 messages, and resource names <-> ids."""

import re
from datetime import datetime

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from adapters.heads import HeadKind
from adapters.trainer import HyperParams
from adapters.tuning import SearchSpace
from service.engine.backbones import BackboneInfo
from service.engine.predictor import ImagePrediction
from service.errors import InvalidArgument
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.jobs import JobInfo
from service.store.datasets import DatasetInfo
from service.store.heads import HeadInfo, HeadVersionInfo
from service.training import TrainRequest

KIND_TO_PB = {HeadKind.LINEAR: pb.HEAD_KIND_LINEAR, HeadKind.MLP: pb.HEAD_KIND_MLP, HeadKind.FINETUNE: pb.HEAD_KIND_FINETUNE}
PB_TO_KIND = {value: kind for kind, value in KIND_TO_PB.items()}

MAX_VERSION = 2**31 - 1
MAX_REF_CHARS = 256
# One path segment of printable characters: no '/', no control characters (PostgreSQL refuses NUL in text).
_SEGMENT = rf"[^/\x00-\x1f\x7f]{{1,{MAX_REF_CHARS}}}"
_HEAD_VERSION = re.compile(rf"heads/({_SEGMENT})/versions/([0-9]{{1,10}})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def resource_id(name: str, collection: str) -> str:
    """'datasets/ds_1' -> 'ds_1'; a bare id is accepted too."""
    value = name.removeprefix(f"{collection}/")
    if re.fullmatch(_SEGMENT, value) is None:
        raise InvalidArgument(
            f"{name[:MAX_REF_CHARS]!r} is not a resource name of the form '{collection}/{{id}}' "
            f"(at most {MAX_REF_CHARS} printable characters, no '/')"
        )
    return value


def head_version_ref(name: str) -> tuple[str, int]:
    """'heads/{head}/versions/{version}' -> (head, version); the version is 1..2^31-1 in ASCII digits."""
    match = _HEAD_VERSION.fullmatch(name)
    if match is None or not 1 <= int(match[2]) <= MAX_VERSION:
        raise InvalidArgument(
            f"{name[:MAX_REF_CHARS]!r} is not of the form 'heads/{{head}}/versions/{{version}}' "
            f"with a version from 1 to {MAX_VERSION}"
        )
    return match[1], int(match[2])


def head_refs(refs: list[str]) -> list[str]:
    """Head references ('name', 'name@3', 'name:prod') as given, once they are printable and short."""
    for ref in refs:
        check_printable("head reference", ref)
    return refs


def check_printable(what: str, value: str) -> str:
    if len(value) > MAX_REF_CHARS or _CONTROL.search(value):
        raise InvalidArgument(f"{what} {value[:MAX_REF_CHARS]!r} must be at most {MAX_REF_CHARS} characters "
                              "with no control characters")
    return value


def head_kind(value: int) -> HeadKind:
    if value not in PB_TO_KIND:
        known = ", ".join(f"{pb.HeadKind.Name(v)} ({v})" for v in PB_TO_KIND)
        raise InvalidArgument(f"kind {value} is not a known head kind; use one of {known}")
    return PB_TO_KIND[value]


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def struct(value: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def backbone(info: BackboneInfo) -> pb.Backbone:
    return pb.Backbone(name=f"backbones/{info.name}", pretrained=info.pretrained, weights_source=info.weights_source,
                       feature_dim=info.feature_dim, num_blocks=info.num_blocks, split_points=info.split_points,
                       input_size=info.input_size, notes=info.notes)


def dataset(info: DatasetInfo) -> pb.Dataset:
    return pb.Dataset(name=f"datasets/{info.id}", display_name=info.name, create_time=timestamp(info.created_at),
                      example_count=info.num_examples, classes=info.classes, examples_per_class=info.counts)


def head_version(info: HeadVersionInfo) -> pb.HeadVersion:
    return pb.HeadVersion(
        name=f"heads/{info.name}/versions/{info.version}", version=info.version, backbone=info.backbone,
        split_point=info.split_point or 0, kind=KIND_TO_PB[HeadKind(info.kind)], classes=info.classes,
        hyperparams=struct(info.hyperparams), metrics=struct(info.metrics), dataset=f"datasets/{info.dataset_id}",
        job=f"jobs/{info.job_id}" if info.job_id else "", param_bytes=info.param_bytes, aliases=info.aliases,
        create_time=timestamp(info.created_at),
    )  # fmt: skip


def head(info: HeadInfo) -> pb.Head:
    return pb.Head(name=f"heads/{info.name}", latest_version=info.latest_version,
                   versions=[head_version(v) for v in info.versions], aliases=info.aliases)


def train_request(spec: pb.TrainingSpec) -> TrainRequest:
    """A TrainingSpec as the core's TrainRequest; unset fields take the core's defaults."""
    fields: dict = {"dataset_id": resource_id(spec.dataset, "datasets"), "head_name": spec.head, "seed": spec.seed}
    if spec.backbone:
        fields["backbone"] = spec.backbone
    if spec.kind != pb.HEAD_KIND_UNSPECIFIED:
        fields["kind"] = head_kind(spec.kind)
    if spec.HasField("finetune_blocks"):
        fields["finetune_blocks"] = spec.finetune_blocks
    if spec.HasField("holdout_fraction"):
        fields["holdout_fraction"] = spec.holdout_fraction
    if spec.HasField("search"):
        search = {"lr": list(spec.search.lr), "weight_decay": list(spec.search.weight_decay)}
        if spec.search.hidden:
            search["hidden"] = list(spec.search.hidden)
        if spec.search.max_trials:
            search["max_trials"] = spec.search.max_trials
        fields["search"] = SearchSpace(**search)
    if spec.HasField("hyperparams"):
        fields["hyperparams"] = HyperParams(**json_format.MessageToDict(spec.hyperparams, preserving_proto_field_name=True,
                                                                          always_print_fields_with_no_presence=True))
    return TrainRequest(**fields)


def training_spec(request: TrainRequest) -> pb.TrainingSpec:
    spec = pb.TrainingSpec(dataset=f"datasets/{request.dataset_id}", head=request.head_name, backbone=request.backbone,
                           kind=KIND_TO_PB[request.kind], holdout_fraction=request.holdout_fraction, seed=request.seed)
    if request.finetune_blocks is not None:
        spec.finetune_blocks = request.finetune_blocks
    if request.search is not None:
        spec.search.CopyFrom(pb.SearchSpace(lr=request.search.lr, weight_decay=request.search.weight_decay,
                                            hidden=request.search.hidden or [], max_trials=request.search.max_trials))
    if request.hyperparams is not None:
        spec.hyperparams.CopyFrom(pb.HyperParams(**request.hyperparams.model_dump(exclude_none=True)))
    return spec


def job(info: JobInfo) -> pb.Job:
    return pb.Job(
        name=f"jobs/{info.id}", state=pb.Job.State.Value(info.state.value.upper()), done=info.done, phase=info.phase,
        progress=info.progress, message=info.message, spec=training_spec(info.request), metrics=struct(info.metrics),
        head_version=f"heads/{info.head}/versions/{info.head_version}" if info.head_version else "",
        error=info.error or "", create_time=timestamp(info.created_at), start_time=timestamp(info.started_at),
        end_time=timestamp(info.finished_at),
    )  # fmt: skip


def image_prediction(prediction: ImagePrediction) -> api.ImagePrediction:
    return api.ImagePrediction(
        heads=[api.HeadPrediction(head=h.head, version=h.version,
                                  top=[api.LabelScore(label=t.label, score=t.score) for t in h.top])
               for h in prediction.heads],
        embedding=prediction.embedding or [],
    )  # fmt: skip
