import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEAD_KIND_UNSPECIFIED: _ClassVar[HeadKind]
    HEAD_KIND_LINEAR: _ClassVar[HeadKind]
    HEAD_KIND_MLP: _ClassVar[HeadKind]
    HEAD_KIND_FINETUNE: _ClassVar[HeadKind]
    HEAD_KIND_PROTOTYPE: _ClassVar[HeadKind]
    HEAD_KIND_AUTO: _ClassVar[HeadKind]

class Objective(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_UNSPECIFIED: _ClassVar[Objective]
    OBJECTIVE_ACCURACY: _ClassVar[Objective]
    OBJECTIVE_BALANCED_ACCURACY: _ClassVar[Objective]

class ClassWeighting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLASS_WEIGHTING_UNSPECIFIED: _ClassVar[ClassWeighting]
    CLASS_WEIGHTING_NONE: _ClassVar[ClassWeighting]
    CLASS_WEIGHTING_BALANCED: _ClassVar[ClassWeighting]

class FeatureScaling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_SCALING_UNSPECIFIED: _ClassVar[FeatureScaling]
    FEATURE_SCALING_NONE: _ClassVar[FeatureScaling]
    FEATURE_SCALING_STANDARDISE: _ClassVar[FeatureScaling]
    FEATURE_SCALING_L2: _ClassVar[FeatureScaling]
HEAD_KIND_UNSPECIFIED: HeadKind
HEAD_KIND_LINEAR: HeadKind
HEAD_KIND_MLP: HeadKind
HEAD_KIND_FINETUNE: HeadKind
HEAD_KIND_PROTOTYPE: HeadKind
HEAD_KIND_AUTO: HeadKind
OBJECTIVE_UNSPECIFIED: Objective
OBJECTIVE_ACCURACY: Objective
OBJECTIVE_BALANCED_ACCURACY: Objective
CLASS_WEIGHTING_UNSPECIFIED: ClassWeighting
CLASS_WEIGHTING_NONE: ClassWeighting
CLASS_WEIGHTING_BALANCED: ClassWeighting
FEATURE_SCALING_UNSPECIFIED: FeatureScaling
FEATURE_SCALING_NONE: FeatureScaling
FEATURE_SCALING_STANDARDISE: FeatureScaling
FEATURE_SCALING_L2: FeatureScaling

class Backbone(_message.Message):
    __slots__ = ("name", "pretrained", "weights_source", "feature_dim", "num_blocks", "split_points", "input_size", "notes", "trunk")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_POINTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    TRUNK_FIELD_NUMBER: _ClassVar[int]
    name: str
    pretrained: bool
    weights_source: str
    feature_dim: int
    num_blocks: int
    split_points: _containers.RepeatedScalarFieldContainer[int]
    input_size: int
    notes: str
    trunk: TrunkRuntime
    def __init__(self, name: _Optional[str] = ..., pretrained: _Optional[bool] = ..., weights_source: _Optional[str] = ..., feature_dim: _Optional[int] = ..., num_blocks: _Optional[int] = ..., split_points: _Optional[_Iterable[int]] = ..., input_size: _Optional[int] = ..., notes: _Optional[str] = ..., trunk: _Optional[_Union[TrunkRuntime, _Mapping]] = ...) -> None: ...

class TrunkRuntime(_message.Message):
    __slots__ = ("runtime", "precision", "images_per_second", "max_abs_diff", "min_cosine")
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    runtime: str
    precision: str
    images_per_second: float
    max_abs_diff: float
    min_cosine: float
    def __init__(self, runtime: _Optional[str] = ..., precision: _Optional[str] = ..., images_per_second: _Optional[float] = ..., max_abs_diff: _Optional[float] = ..., min_cosine: _Optional[float] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "display_name", "create_time", "example_count", "classes", "examples_per_class", "labelled_example_count", "unlabelled_example_count")
    class ExamplesPerClassEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    LABELLED_EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNLABELLED_EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    create_time: _timestamp_pb2.Timestamp
    example_count: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    examples_per_class: _containers.ScalarMap[str, int]
    labelled_example_count: int
    unlabelled_example_count: int
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., example_count: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., examples_per_class: _Optional[_Mapping[str, int]] = ..., labelled_example_count: _Optional[int] = ..., unlabelled_example_count: _Optional[int] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("name", "index", "file_name", "client_id", "label", "image_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    file_name: str
    client_id: str
    label: str
    image_sha256: str
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., file_name: _Optional[str] = ..., client_id: _Optional[str] = ..., label: _Optional[str] = ..., image_sha256: _Optional[str] = ...) -> None: ...

class AuditedExample(_message.Message):
    __slots__ = ("index", "image_sha256", "label", "file_name", "client_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    image_sha256: str
    label: str
    file_name: str
    client_id: str
    def __init__(self, index: _Optional[int] = ..., image_sha256: _Optional[str] = ..., label: _Optional[str] = ..., file_name: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class LabelSuspect(_message.Message):
    __slots__ = ("example", "suggested_label", "label_score", "suggested_score")
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    SUGGESTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SCORE_FIELD_NUMBER: _ClassVar[int]
    SUGGESTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    example: AuditedExample
    suggested_label: str
    label_score: float
    suggested_score: float
    def __init__(self, example: _Optional[_Union[AuditedExample, _Mapping]] = ..., suggested_label: _Optional[str] = ..., label_score: _Optional[float] = ..., suggested_score: _Optional[float] = ...) -> None: ...

class DuplicatePair(_message.Message):
    __slots__ = ("first", "second", "similarity", "identical")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    IDENTICAL_FIELD_NUMBER: _ClassVar[int]
    first: AuditedExample
    second: AuditedExample
    similarity: float
    identical: bool
    def __init__(self, first: _Optional[_Union[AuditedExample, _Mapping]] = ..., second: _Optional[_Union[AuditedExample, _Mapping]] = ..., similarity: _Optional[float] = ..., identical: _Optional[bool] = ...) -> None: ...

class DatasetAudit(_message.Message):
    __slots__ = ("dataset", "backbone", "example_count", "folds", "class_thresholds", "suspect_count", "suspects", "duplicate_count", "duplicates", "duplicates_truncated")
    class ClassThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DATASET_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FOLDS_FIELD_NUMBER: _ClassVar[int]
    CLASS_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_COUNT_FIELD_NUMBER: _ClassVar[int]
    SUSPECTS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    backbone: str
    example_count: int
    folds: int
    class_thresholds: _containers.ScalarMap[str, float]
    suspect_count: int
    suspects: _containers.RepeatedCompositeFieldContainer[LabelSuspect]
    duplicate_count: int
    duplicates: _containers.RepeatedCompositeFieldContainer[DuplicatePair]
    duplicates_truncated: bool
    def __init__(self, dataset: _Optional[str] = ..., backbone: _Optional[str] = ..., example_count: _Optional[int] = ..., folds: _Optional[int] = ..., class_thresholds: _Optional[_Mapping[str, float]] = ..., suspect_count: _Optional[int] = ..., suspects: _Optional[_Iterable[_Union[LabelSuspect, _Mapping]]] = ..., duplicate_count: _Optional[int] = ..., duplicates: _Optional[_Iterable[_Union[DuplicatePair, _Mapping]]] = ..., duplicates_truncated: _Optional[bool] = ...) -> None: ...

class SearchSpace(_message.Message):
    __slots__ = ("lr", "weight_decay", "hidden", "max_trials")
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    MAX_TRIALS_FIELD_NUMBER: _ClassVar[int]
    lr: _containers.RepeatedScalarFieldContainer[float]
    weight_decay: _containers.RepeatedScalarFieldContainer[float]
    hidden: _containers.RepeatedScalarFieldContainer[int]
    max_trials: int
    def __init__(self, lr: _Optional[_Iterable[float]] = ..., weight_decay: _Optional[_Iterable[float]] = ..., hidden: _Optional[_Iterable[int]] = ..., max_trials: _Optional[int] = ...) -> None: ...

class HyperParams(_message.Message):
    __slots__ = ("lr", "weight_decay", "epochs", "batch_size", "hidden", "label_smoothing", "patience")
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    hidden: int
    label_smoothing: float
    patience: int
    def __init__(self, lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., hidden: _Optional[int] = ..., label_smoothing: _Optional[float] = ..., patience: _Optional[int] = ...) -> None: ...

class TrainingSpec(_message.Message):
    __slots__ = ("dataset", "head", "backbone", "kind", "finetune_blocks", "search", "hyperparams", "holdout_fraction", "seed", "latency_budget_ms", "time_budget_s", "auto_finetune", "objective", "class_weighting", "scaling")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    AUTO_FINETUNE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    CLASS_WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    head: str
    backbone: str
    kind: HeadKind
    finetune_blocks: int
    search: SearchSpace
    hyperparams: HyperParams
    holdout_fraction: float
    seed: int
    latency_budget_ms: float
    time_budget_s: float
    auto_finetune: bool
    objective: Objective
    class_weighting: ClassWeighting
    scaling: FeatureScaling
    def __init__(self, dataset: _Optional[str] = ..., head: _Optional[str] = ..., backbone: _Optional[str] = ..., kind: _Optional[_Union[HeadKind, str]] = ..., finetune_blocks: _Optional[int] = ..., search: _Optional[_Union[SearchSpace, _Mapping]] = ..., hyperparams: _Optional[_Union[HyperParams, _Mapping]] = ..., holdout_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., latency_budget_ms: _Optional[float] = ..., time_budget_s: _Optional[float] = ..., auto_finetune: _Optional[bool] = ..., objective: _Optional[_Union[Objective, str]] = ..., class_weighting: _Optional[_Union[ClassWeighting, str]] = ..., scaling: _Optional[_Union[FeatureScaling, str]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "state", "done", "phase", "progress", "message", "spec", "metrics", "head_version", "error", "create_time", "start_time", "end_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        QUEUED: _ClassVar[Job.State]
        RUNNING: _ClassVar[Job.State]
        SUCCEEDED: _ClassVar[Job.State]
        FAILED: _ClassVar[Job.State]
        CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    QUEUED: Job.State
    RUNNING: Job.State
    SUCCEEDED: Job.State
    FAILED: Job.State
    CANCELLED: Job.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: Job.State
    done: bool
    phase: str
    progress: float
    message: str
    spec: TrainingSpec
    metrics: _struct_pb2.Struct
    head_version: str
    error: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., done: _Optional[bool] = ..., phase: _Optional[str] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., spec: _Optional[_Union[TrainingSpec, _Mapping]] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., head_version: _Optional[str] = ..., error: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BatchPredictionSpec(_message.Message):
    __slots__ = ("dataset", "heads", "top_k", "min_score")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    heads: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    min_score: float
    def __init__(self, dataset: _Optional[str] = ..., heads: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class BatchPrediction(_message.Message):
    __slots__ = ("name", "spec", "head_versions", "state", "done", "images_done", "images_total", "error", "create_time", "start_time", "end_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_DONE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: BatchPredictionSpec
    head_versions: _containers.RepeatedScalarFieldContainer[str]
    state: Job.State
    done: bool
    images_done: int
    images_total: int
    error: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[BatchPredictionSpec, _Mapping]] = ..., head_versions: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[Job.State, str]] = ..., done: _Optional[bool] = ..., images_done: _Optional[int] = ..., images_total: _Optional[int] = ..., error: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class HeadVersion(_message.Message):
    __slots__ = ("name", "version", "backbone", "split_point", "kind", "classes", "hyperparams", "metrics", "dataset", "job", "param_bytes", "aliases", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_POINT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    backbone: str
    split_point: int
    kind: HeadKind
    classes: _containers.RepeatedScalarFieldContainer[str]
    hyperparams: _struct_pb2.Struct
    metrics: _struct_pb2.Struct
    dataset: str
    job: str
    param_bytes: int
    aliases: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., backbone: _Optional[str] = ..., split_point: _Optional[int] = ..., kind: _Optional[_Union[HeadKind, str]] = ..., classes: _Optional[_Iterable[str]] = ..., hyperparams: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., dataset: _Optional[str] = ..., job: _Optional[str] = ..., param_bytes: _Optional[int] = ..., aliases: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Head(_message.Message):
    __slots__ = ("name", "latest_version", "versions", "aliases", "shadow_version")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    latest_version: int
    versions: _containers.RepeatedCompositeFieldContainer[HeadVersion]
    aliases: _containers.ScalarMap[str, int]
    shadow_version: int
    def __init__(self, name: _Optional[str] = ..., latest_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[HeadVersion, _Mapping]]] = ..., aliases: _Optional[_Mapping[str, int]] = ..., shadow_version: _Optional[int] = ...) -> None: ...

class Webhook(_message.Message):
    __slots__ = ("name", "url", "event_types", "description", "create_time", "secret")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    event_types: _containers.RepeatedScalarFieldContainer[str]
    description: str
    create_time: _timestamp_pb2.Timestamp
    secret: str
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., event_types: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class WebhookDelivery(_message.Message):
    __slots__ = ("name", "event_id", "event_type", "state", "attempts", "last_status_code", "last_error", "create_time", "last_attempt_time", "next_attempt_time", "deliver_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[WebhookDelivery.State]
        PENDING: _ClassVar[WebhookDelivery.State]
        DELIVERED: _ClassVar[WebhookDelivery.State]
        FAILED: _ClassVar[WebhookDelivery.State]
    STATE_UNSPECIFIED: WebhookDelivery.State
    PENDING: WebhookDelivery.State
    DELIVERED: WebhookDelivery.State
    FAILED: WebhookDelivery.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    DELIVER_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    event_id: str
    event_type: str
    state: WebhookDelivery.State
    attempts: int
    last_status_code: int
    last_error: str
    create_time: _timestamp_pb2.Timestamp
    last_attempt_time: _timestamp_pb2.Timestamp
    next_attempt_time: _timestamp_pb2.Timestamp
    deliver_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., event_id: _Optional[str] = ..., event_type: _Optional[str] = ..., state: _Optional[_Union[WebhookDelivery.State, str]] = ..., attempts: _Optional[int] = ..., last_status_code: _Optional[int] = ..., last_error: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deliver_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
