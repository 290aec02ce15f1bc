import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from client._proto.graft.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SuggestionStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUGGESTION_STRATEGY_UNSPECIFIED: _ClassVar[SuggestionStrategy]
    SUGGESTION_STRATEGY_DIVERSE_MARGIN: _ClassVar[SuggestionStrategy]
    SUGGESTION_STRATEGY_MARGIN: _ClassVar[SuggestionStrategy]
    SUGGESTION_STRATEGY_RANDOM: _ClassVar[SuggestionStrategy]
    SUGGESTION_STRATEGY_SET_SIZE: _ClassVar[SuggestionStrategy]

class DriftStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRIFT_STATUS_UNSPECIFIED: _ClassVar[DriftStatus]
    DRIFT_STATUS_OK: _ClassVar[DriftStatus]
    DRIFT_STATUS_DRIFTING: _ClassVar[DriftStatus]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_SAFETENSORS: _ClassVar[ExportFormat]
    EXPORT_FORMAT_ONNX: _ClassVar[ExportFormat]
    EXPORT_FORMAT_PT2: _ClassVar[ExportFormat]

class BatchResultsFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_RESULTS_FORMAT_UNSPECIFIED: _ClassVar[BatchResultsFormat]
    BATCH_RESULTS_FORMAT_JSONL: _ClassVar[BatchResultsFormat]
    BATCH_RESULTS_FORMAT_CSV: _ClassVar[BatchResultsFormat]
SUGGESTION_STRATEGY_UNSPECIFIED: SuggestionStrategy
SUGGESTION_STRATEGY_DIVERSE_MARGIN: SuggestionStrategy
SUGGESTION_STRATEGY_MARGIN: SuggestionStrategy
SUGGESTION_STRATEGY_RANDOM: SuggestionStrategy
SUGGESTION_STRATEGY_SET_SIZE: SuggestionStrategy
DRIFT_STATUS_UNSPECIFIED: DriftStatus
DRIFT_STATUS_OK: DriftStatus
DRIFT_STATUS_DRIFTING: DriftStatus
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_SAFETENSORS: ExportFormat
EXPORT_FORMAT_ONNX: ExportFormat
EXPORT_FORMAT_PT2: ExportFormat
BATCH_RESULTS_FORMAT_UNSPECIFIED: BatchResultsFormat
BATCH_RESULTS_FORMAT_JSONL: BatchResultsFormat
BATCH_RESULTS_FORMAT_CSV: BatchResultsFormat

class GetBackboneRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListBackbonesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackbonesResponse(_message.Message):
    __slots__ = ("backbones",)
    BACKBONES_FIELD_NUMBER: _ClassVar[int]
    backbones: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Backbone]
    def __init__(self, backbones: _Optional[_Iterable[_Union[_resources_pb2.Backbone, _Mapping]]] = ...) -> None: ...

class CreateDatasetRequest(_message.Message):
    __slots__ = ("header", "image")
    class Header(_message.Message):
        __slots__ = ("display_name",)
        DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
        display_name: str
        def __init__(self, display_name: _Optional[str] = ...) -> None: ...
    class Image(_message.Message):
        __slots__ = ("file_name", "label", "data", "client_id")
        FILE_NAME_FIELD_NUMBER: _ClassVar[int]
        LABEL_FIELD_NUMBER: _ClassVar[int]
        DATA_FIELD_NUMBER: _ClassVar[int]
        CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
        file_name: str
        label: str
        data: bytes
        client_id: str
        def __init__(self, file_name: _Optional[str] = ..., label: _Optional[str] = ..., data: _Optional[bytes] = ..., client_id: _Optional[str] = ...) -> None: ...
    HEADER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    header: CreateDatasetRequest.Header
    image: CreateDatasetRequest.Image
    def __init__(self, header: _Optional[_Union[CreateDatasetRequest.Header, _Mapping]] = ..., image: _Optional[_Union[CreateDatasetRequest.Image, _Mapping]] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Dataset]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[_resources_pb2.Dataset, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListExamplesRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExamplesResponse(_message.Message):
    __slots__ = ("examples", "next_page_token")
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    examples: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Example]
    next_page_token: str
    def __init__(self, examples: _Optional[_Iterable[_Union[_resources_pb2.Example, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetExampleRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UpdateExampleRequest(_message.Message):
    __slots__ = ("example", "update_mask")
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    example: _resources_pb2.Example
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, example: _Optional[_Union[_resources_pb2.Example, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class ExampleLabel(_message.Message):
    __slots__ = ("example", "label")
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    example: str
    label: str
    def __init__(self, example: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class BatchUpdateExamplesRequest(_message.Message):
    __slots__ = ("parent", "updates")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    parent: str
    updates: _containers.RepeatedCompositeFieldContainer[ExampleLabel]
    def __init__(self, parent: _Optional[str] = ..., updates: _Optional[_Iterable[_Union[ExampleLabel, _Mapping]]] = ...) -> None: ...

class BatchUpdateExamplesResponse(_message.Message):
    __slots__ = ("examples",)
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    examples: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Example]
    def __init__(self, examples: _Optional[_Iterable[_Union[_resources_pb2.Example, _Mapping]]] = ...) -> None: ...

class ImportLabelsRequest(_message.Message):
    __slots__ = ("parent", "csv")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CSV_FIELD_NUMBER: _ClassVar[int]
    parent: str
    csv: bytes
    def __init__(self, parent: _Optional[str] = ..., csv: _Optional[bytes] = ...) -> None: ...

class ImportLabelsResponse(_message.Message):
    __slots__ = ("row_count", "dataset")
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    row_count: int
    dataset: _resources_pb2.Dataset
    def __init__(self, row_count: _Optional[int] = ..., dataset: _Optional[_Union[_resources_pb2.Dataset, _Mapping]] = ...) -> None: ...

class AuditDatasetRequest(_message.Message):
    __slots__ = ("name", "backbone", "max_suspects", "max_duplicates", "duplicate_similarity")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    MAX_SUSPECTS_FIELD_NUMBER: _ClassVar[int]
    MAX_DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    backbone: str
    max_suspects: int
    max_duplicates: int
    duplicate_similarity: float
    def __init__(self, name: _Optional[str] = ..., backbone: _Optional[str] = ..., max_suspects: _Optional[int] = ..., max_duplicates: _Optional[int] = ..., duplicate_similarity: _Optional[float] = ...) -> None: ...

class GetExampleImageRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ExampleImage(_message.Message):
    __slots__ = ("content_type", "data")
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    content_type: str
    data: bytes
    def __init__(self, content_type: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class SuggestExamplesRequest(_message.Message):
    __slots__ = ("name", "head", "count", "strategy", "seed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    name: str
    head: str
    count: int
    strategy: SuggestionStrategy
    seed: int
    def __init__(self, name: _Optional[str] = ..., head: _Optional[str] = ..., count: _Optional[int] = ..., strategy: _Optional[_Union[SuggestionStrategy, str]] = ..., seed: _Optional[int] = ...) -> None: ...

class ExampleSuggestion(_message.Message):
    __slots__ = ("example", "score", "margin", "cluster", "reason", "likeliest")
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LIKELIEST_FIELD_NUMBER: _ClassVar[int]
    example: _resources_pb2.Example
    score: float
    margin: float
    cluster: int
    reason: str
    likeliest: _containers.RepeatedCompositeFieldContainer[LabelScore]
    def __init__(self, example: _Optional[_Union[_resources_pb2.Example, _Mapping]] = ..., score: _Optional[float] = ..., margin: _Optional[float] = ..., cluster: _Optional[int] = ..., reason: _Optional[str] = ..., likeliest: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ...) -> None: ...

class SuggestExamplesResponse(_message.Message):
    __slots__ = ("dataset", "head_version", "strategy", "pool_size", "labelled_size", "suggestions")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    LABELLED_SIZE_FIELD_NUMBER: _ClassVar[int]
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    head_version: str
    strategy: SuggestionStrategy
    pool_size: int
    labelled_size: int
    suggestions: _containers.RepeatedCompositeFieldContainer[ExampleSuggestion]
    def __init__(self, dataset: _Optional[str] = ..., head_version: _Optional[str] = ..., strategy: _Optional[_Union[SuggestionStrategy, str]] = ..., pool_size: _Optional[int] = ..., labelled_size: _Optional[int] = ..., suggestions: _Optional[_Iterable[_Union[ExampleSuggestion, _Mapping]]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _resources_pb2.TrainingSpec
    def __init__(self, spec: _Optional[_Union[_resources_pb2.TrainingSpec, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[_resources_pb2.Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetHeadRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetHeadVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListHeadsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListHeadsResponse(_message.Message):
    __slots__ = ("heads", "next_page_token")
    HEADS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Head]
    next_page_token: str
    def __init__(self, heads: _Optional[_Iterable[_Union[_resources_pb2.Head, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteHeadRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteHeadVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: int
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RemoveAliasRequest(_message.Message):
    __slots__ = ("name", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class SetHeadShadowRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ClearHeadShadowRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CompareHeadVersionsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class HeadComparison(_message.Message):
    __slots__ = ("served_version", "shadow_version", "compared", "agreement", "mean_top_score_difference", "labels", "confusion", "labelled", "served_accuracy", "shadow_accuracy")
    class ConfusionRow(_message.Message):
        __slots__ = ("counts",)
        COUNTS_FIELD_NUMBER: _ClassVar[int]
        counts: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, counts: _Optional[_Iterable[int]] = ...) -> None: ...
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MEAN_TOP_SCORE_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    SERVED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    served_version: int
    shadow_version: int
    compared: int
    agreement: float
    mean_top_score_difference: float
    labels: _containers.RepeatedScalarFieldContainer[str]
    confusion: _containers.RepeatedCompositeFieldContainer[HeadComparison.ConfusionRow]
    labelled: int
    served_accuracy: float
    shadow_accuracy: float
    def __init__(self, served_version: _Optional[int] = ..., shadow_version: _Optional[int] = ..., compared: _Optional[int] = ..., agreement: _Optional[float] = ..., mean_top_score_difference: _Optional[float] = ..., labels: _Optional[_Iterable[str]] = ..., confusion: _Optional[_Iterable[_Union[HeadComparison.ConfusionRow, _Mapping]]] = ..., labelled: _Optional[int] = ..., served_accuracy: _Optional[float] = ..., shadow_accuracy: _Optional[float] = ...) -> None: ...

class CompareHeadVersionsResponse(_message.Message):
    __slots__ = ("head", "comparisons")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    head: str
    comparisons: _containers.RepeatedCompositeFieldContainer[HeadComparison]
    def __init__(self, head: _Optional[str] = ..., comparisons: _Optional[_Iterable[_Union[HeadComparison, _Mapping]]] = ...) -> None: ...

class GetHeadMonitoringRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ClearHeadDriftRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DriftTest(_message.Message):
    __slots__ = ("statistic", "threshold", "p_value", "drifting", "window", "test")
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    DRIFTING_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    statistic: float
    threshold: float
    p_value: float
    drifting: bool
    window: int
    test: str
    def __init__(self, statistic: _Optional[float] = ..., threshold: _Optional[float] = ..., p_value: _Optional[float] = ..., drifting: _Optional[bool] = ..., window: _Optional[int] = ..., test: _Optional[str] = ...) -> None: ...

class MonitorWindow(_message.Message):
    __slots__ = ("end_time", "predictions", "label_counts", "label_distance", "confidence_histogram", "abstention_rate", "ood_rate", "mean_ood_score", "drift")
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    LABEL_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    ABSTENTION_RATE_FIELD_NUMBER: _ClassVar[int]
    OOD_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_OOD_SCORE_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    end_time: _timestamp_pb2.Timestamp
    predictions: int
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    label_distance: float
    confidence_histogram: _containers.RepeatedScalarFieldContainer[int]
    abstention_rate: float
    ood_rate: float
    mean_ood_score: float
    drift: DriftTest
    def __init__(self, end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., predictions: _Optional[int] = ..., label_counts: _Optional[_Iterable[int]] = ..., label_distance: _Optional[float] = ..., confidence_histogram: _Optional[_Iterable[int]] = ..., abstention_rate: _Optional[float] = ..., ood_rate: _Optional[float] = ..., mean_ood_score: _Optional[float] = ..., drift: _Optional[_Union[DriftTest, _Mapping]] = ...) -> None: ...

class LiveAccuracy(_message.Message):
    __slots__ = ("labelled", "accuracy")
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    labelled: int
    accuracy: float
    def __init__(self, labelled: _Optional[int] = ..., accuracy: _Optional[float] = ...) -> None: ...

class HeadMonitoring(_message.Message):
    __slots__ = ("head", "version", "status", "drifting_since", "evidence", "reference", "reference_note", "labels", "training_label_distribution", "live", "windows")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DRIFTING_SINCE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_NOTE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_LABEL_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    head: str
    version: int
    status: DriftStatus
    drifting_since: _timestamp_pb2.Timestamp
    evidence: MonitorWindow
    reference: bool
    reference_note: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    training_label_distribution: _containers.RepeatedScalarFieldContainer[float]
    live: LiveAccuracy
    windows: _containers.RepeatedCompositeFieldContainer[MonitorWindow]
    def __init__(self, head: _Optional[str] = ..., version: _Optional[int] = ..., status: _Optional[_Union[DriftStatus, str]] = ..., drifting_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., evidence: _Optional[_Union[MonitorWindow, _Mapping]] = ..., reference: _Optional[bool] = ..., reference_note: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., training_label_distribution: _Optional[_Iterable[float]] = ..., live: _Optional[_Union[LiveAccuracy, _Mapping]] = ..., windows: _Optional[_Iterable[_Union[MonitorWindow, _Mapping]]] = ...) -> None: ...

class CreateBatchPredictionRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _resources_pb2.BatchPredictionSpec
    def __init__(self, spec: _Optional[_Union[_resources_pb2.BatchPredictionSpec, _Mapping]] = ...) -> None: ...

class GetBatchPredictionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListBatchPredictionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBatchPredictionsResponse(_message.Message):
    __slots__ = ("batch_predictions", "next_page_token")
    BATCH_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    batch_predictions: _containers.RepeatedCompositeFieldContainer[_resources_pb2.BatchPrediction]
    next_page_token: str
    def __init__(self, batch_predictions: _Optional[_Iterable[_Union[_resources_pb2.BatchPrediction, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelBatchPredictionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteBatchPredictionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetBatchPredictionResultsRequest(_message.Message):
    __slots__ = ("name", "format")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: BatchResultsFormat
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[BatchResultsFormat, str]] = ...) -> None: ...

class BatchPredictionResultsChunk(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class ExportHeadRequest(_message.Message):
    __slots__ = ("head", "format", "additional_heads")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_HEADS_FIELD_NUMBER: _ClassVar[int]
    head: str
    format: ExportFormat
    additional_heads: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, head: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ..., additional_heads: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportHeadResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class HeadPrediction(_message.Message):
    __slots__ = ("head", "version", "top", "abstained", "prediction_set", "shadow")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    ABSTAINED_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_SET_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    head: str
    version: int
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    abstained: bool
    prediction_set: _containers.RepeatedScalarFieldContainer[str]
    shadow: HeadPrediction
    def __init__(self, head: _Optional[str] = ..., version: _Optional[int] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., abstained: _Optional[bool] = ..., prediction_set: _Optional[_Iterable[str]] = ..., shadow: _Optional[_Union[HeadPrediction, _Mapping]] = ...) -> None: ...

class ImagePrediction(_message.Message):
    __slots__ = ("heads", "embedding", "prediction_id")
    HEADS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[HeadPrediction]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    prediction_id: str
    def __init__(self, heads: _Optional[_Iterable[_Union[HeadPrediction, _Mapping]]] = ..., embedding: _Optional[_Iterable[float]] = ..., prediction_id: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("images", "heads", "top_k", "include_embedding", "min_score", "coverage", "include_shadow")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SHADOW_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    heads: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    include_embedding: bool
    min_score: float
    coverage: float
    include_shadow: bool
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., heads: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., include_embedding: _Optional[bool] = ..., min_score: _Optional[float] = ..., coverage: _Optional[float] = ..., include_shadow: _Optional[bool] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions",)
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[ImagePrediction]
    def __init__(self, predictions: _Optional[_Iterable[_Union[ImagePrediction, _Mapping]]] = ...) -> None: ...

class ReportPredictionFeedbackRequest(_message.Message):
    __slots__ = ("name", "label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    label: str
    def __init__(self, name: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class FeedbackVerdict(_message.Message):
    __slots__ = ("head", "version", "correct", "shadow_version", "shadow_correct")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_CORRECT_FIELD_NUMBER: _ClassVar[int]
    head: str
    version: int
    correct: bool
    shadow_version: int
    shadow_correct: bool
    def __init__(self, head: _Optional[str] = ..., version: _Optional[int] = ..., correct: _Optional[bool] = ..., shadow_version: _Optional[int] = ..., shadow_correct: _Optional[bool] = ...) -> None: ...

class PredictionFeedback(_message.Message):
    __slots__ = ("prediction_id", "label", "heads")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    label: str
    heads: _containers.RepeatedCompositeFieldContainer[FeedbackVerdict]
    def __init__(self, prediction_id: _Optional[str] = ..., label: _Optional[str] = ..., heads: _Optional[_Iterable[_Union[FeedbackVerdict, _Mapping]]] = ...) -> None: ...

class StreamPredictRequest(_message.Message):
    __slots__ = ("request_id", "image", "heads", "top_k", "include_embedding", "min_score", "coverage", "include_shadow")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SHADOW_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: bytes
    heads: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    include_embedding: bool
    min_score: float
    coverage: float
    include_shadow: bool
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[bytes] = ..., heads: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., include_embedding: _Optional[bool] = ..., min_score: _Optional[float] = ..., coverage: _Optional[float] = ..., include_shadow: _Optional[bool] = ...) -> None: ...

class StreamPredictResponse(_message.Message):
    __slots__ = ("request_id", "prediction", "error_code", "error_message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prediction: ImagePrediction
    error_code: int
    error_message: str
    def __init__(self, request_id: _Optional[str] = ..., prediction: _Optional[_Union[ImagePrediction, _Mapping]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class CreateWebhookRequest(_message.Message):
    __slots__ = ("url", "event_types", "description")
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    url: str
    event_types: _containers.RepeatedScalarFieldContainer[str]
    description: str
    def __init__(self, url: _Optional[str] = ..., event_types: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ...) -> None: ...

class GetWebhookRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListWebhooksRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWebhooksResponse(_message.Message):
    __slots__ = ("webhooks", "next_page_token")
    WEBHOOKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    webhooks: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Webhook]
    next_page_token: str
    def __init__(self, webhooks: _Optional[_Iterable[_Union[_resources_pb2.Webhook, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteWebhookRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListWebhookDeliveriesRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWebhookDeliveriesResponse(_message.Message):
    __slots__ = ("deliveries", "next_page_token")
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[_resources_pb2.WebhookDelivery]
    next_page_token: str
    def __init__(self, deliveries: _Optional[_Iterable[_Union[_resources_pb2.WebhookDelivery, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TestWebhookRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
