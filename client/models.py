"""The resources the server documents (protos/graft/v1, the HTTP JSON), as the client reads them.

The field names and meanings are the contract's, not a second vocabulary:
``name`` is a resource name (``datasets/{id}``, ``heads/{head}/versions/{v}``),
``display_name`` what a person called it. Over gRPC the messages are turned into
the same JSON (proto field names, lowercase enum values), so both transports
return these models. Unknown fields are ignored and enumerated fields (kind,
state, objective, ...) take any string: a newer server does not break an older client
(tests/unit/test_client.py checks the names against the protos).
"""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from client._proto.graft.v1 import resources_pb2, service_pb2


def _json_values(proto_names: list[str], prefix: str) -> tuple[str, ...]:
    """A proto enum's values as the JSON spells them (HEAD_KIND_LINEAR -> linear), leaving out UNSPECIFIED."""
    return tuple(name.removeprefix(prefix).lower() for name in proto_names if not name.endswith("UNSPECIFIED"))


# The values this client's protos know (`make protos` brings new ones), which the CLI offers. A newer server may
# answer others, so the models take any string there: clients tolerate unknown enum values (AIP-126).
TRAINING_KINDS = _json_values(resources_pb2.HeadKind.keys(), "HEAD_KIND_")
AUTO_KIND = "auto"  # request only: a version's kind is the kind that won
HEAD_KINDS = tuple(kind for kind in TRAINING_KINDS if kind != AUTO_KIND)
JOB_STATES = _json_values(resources_pb2.Job.State.keys(), "")
EXPORT_FORMATS = _json_values(service_pb2.ExportFormat.keys(), "EXPORT_FORMAT_")
OBJECTIVES = _json_values(resources_pb2.Objective.keys(), "OBJECTIVE_")
CLASS_WEIGHTINGS = _json_values(resources_pb2.ClassWeighting.keys(), "CLASS_WEIGHTING_")
SCALINGS = _json_values(resources_pb2.FeatureScaling.keys(), "FEATURE_SCALING_")
DRIFT_STATUSES = _json_values(service_pb2.DriftStatus.keys(), "DRIFT_STATUS_")
SUGGESTION_STRATEGIES = _json_values(service_pb2.SuggestionStrategy.keys(), "SUGGESTION_STRATEGY_")
DELIVERY_STATES = _json_values(resources_pb2.WebhookDelivery.State.keys(), "")
# The event types a webhook may subscribe to (the server's registry, service/webhooks/events.py; a test checks it).
WEBHOOK_EVENTS = (
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "batch_prediction.finished",
    "head_version.drifting",
)
RESULTS_FORMATS = _json_values(service_pb2.BatchResultsFormat.keys(), "BATCH_RESULTS_FORMAT_")


class TrunkRuntime(BaseModel):
    """How a replica runs a backbone's frozen trunk (runtime and precision: any string a newer server names)."""

    runtime: str = ""
    precision: str = ""
    images_per_second: float = 0.0
    max_abs_diff: float = 0.0
    min_cosine: float = 0.0


class Backbone(BaseModel):
    name: str
    pretrained: bool = True
    weights_source: str = ""
    feature_dim: int = 0
    num_blocks: int = 0
    split_points: list[int] = []
    input_size: int = 0
    notes: str = ""
    trunk: TrunkRuntime | None = None


class Dataset(BaseModel):
    name: str = Field(description="datasets/{dataset}")
    display_name: str
    create_time: datetime
    example_count: int
    classes: list[str]
    examples_per_class: dict[str, int]
    labelled_example_count: int = 0
    unlabelled_example_count: int = 0

    @property
    def id(self) -> str:
        return self.name.removeprefix("datasets/")


class DatasetExample(BaseModel):
    """One image of a dataset, its label (None: unlabelled) and the names its upload gave it."""

    name: str = Field(description="datasets/{dataset}/examples/{index}")
    index: int = Field(description="position in upload order")
    file_name: str | None = Field(None, description="as uploaded; None for examples uploaded before graft kept names")
    client_id: str | None = None
    label: str | None = None
    image_sha256: str

    @property
    def display(self) -> str:
        return self.file_name or f"#{self.index}"


class LabelImport(BaseModel):
    """What a label import did: the rows it applied and the dataset after them."""

    row_count: int
    dataset: Dataset


class AuditedExample(BaseModel):
    index: int = Field(description="position in upload order")
    image_sha256: str
    label: str
    file_name: str | None = Field(None, description="as uploaded; None for examples uploaded before graft kept names")
    client_id: str | None = None

    @property
    def display(self) -> str:
        """What a person finds the image by: its file name, else its position."""
        return self.file_name or f"#{self.index}"


class LabelSuspect(BaseModel):
    example: AuditedExample
    suggested_label: str
    label_score: float = Field(description="out-of-fold probability of the given label")
    suggested_score: float = Field(description="out-of-fold probability of the suggested label")


class DuplicatePair(BaseModel):
    first: AuditedExample
    second: AuditedExample
    similarity: float
    identical: bool = False


class DatasetAudit(BaseModel):
    """Images whose label is probably wrong (ranked) and near-duplicates under different labels."""

    dataset: str = Field(description="datasets/{dataset}")
    backbone: str
    example_count: int
    folds: int
    class_thresholds: dict[str, float] = {}
    suspect_count: int = 0
    suspects: list[LabelSuspect] = []
    duplicate_count: int = 0
    duplicates: list[DuplicatePair] = []
    duplicates_truncated: bool = False  # the search hit its bound: duplicate_count is a lower bound


class SearchSpace(BaseModel):
    lr: list[float] | None = None
    weight_decay: list[float] | None = None
    hidden: list[int] | None = None
    max_trials: int | None = None


class HyperParams(BaseModel):
    """Fixed settings the search varies around; unset ones take the kind's defaults on the server."""

    lr: float | None = None
    weight_decay: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    hidden: int | None = None
    label_smoothing: float | None = None
    patience: int | None = None


class TrainingSpec(BaseModel):
    """What to train (the body of ``POST /v1/jobs``); unset fields take the server's defaults."""

    dataset: str = Field(description="datasets/{dataset}")
    head: str
    backbone: str | None = None
    latency_budget_ms: float | None = None
    kind: str | None = Field(None, description=f"{', '.join(TRAINING_KINDS)}, or a kind newer than this client")
    time_budget_s: float | None = None
    auto_finetune: bool | None = None
    finetune_blocks: int | None = None
    search: SearchSpace | None = None
    hyperparams: HyperParams | None = None
    objective: str | None = Field(
        None, description=f"what 'best' means: {', '.join(OBJECTIVES)}, or an objective newer than this client"
    )
    class_weighting: str | None = Field(
        None, description=f"{', '.join(CLASS_WEIGHTINGS)}, or a class weighting newer than this client"
    )
    scaling: str | None = Field(
        None, description=f"feature scaling: {', '.join(SCALINGS)}, or a scaling newer than this client"
    )
    holdout_fraction: float | None = None
    seed: int | None = None


class Job(BaseModel):
    name: str = Field(description="jobs/{job}")
    state: str = Field(description=f"{', '.join(JOB_STATES)}, or a state newer than this client")
    done: bool
    phase: str = ""
    progress: float = 0.0
    message: str = ""
    spec: TrainingSpec
    metrics: dict[str, Any] = {}
    head_version: str | None = Field(None, description="heads/{head}/versions/{version} once succeeded")
    error: str | None = None
    create_time: datetime
    start_time: datetime | None = None
    end_time: datetime | None = None


class BatchPredictionSpec(BaseModel):
    """What a batch prediction answers (the body of ``POST /v1/batchPredictions``)."""

    dataset: str = Field(description="datasets/{dataset}")
    heads: list[str] = Field(description="head references: 'name', 'name@3', 'name:prod'")
    top_k: int = 5
    min_score: float = 0.0


class BatchPrediction(BaseModel):
    name: str = Field(description="batchPredictions/{batch_prediction}")
    spec: BatchPredictionSpec
    head_versions: list[str] = Field([], description="each head reference as the version it named at creation")
    state: str = Field(description=f"{', '.join(JOB_STATES)}, or a state newer than this client")
    done: bool
    images_done: int = 0
    images_total: int = 0
    error: str | None = None
    create_time: datetime
    start_time: datetime | None = None
    end_time: datetime | None = None


class HeadVersion(BaseModel):
    name: str = Field(description="heads/{head}/versions/{version}")
    version: int
    backbone: str
    split_point: int | None = None
    kind: str = Field(description=f"{', '.join(HEAD_KINDS)}, or a kind newer than this client")
    classes: list[str]
    hyperparams: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    dataset: str = ""
    job: str | None = None
    param_bytes: int = 0
    aliases: list[str] = []
    create_time: datetime

    @property
    def display(self) -> str:
        """``head@version``, as predictions and the CLI name it."""
        head, _, version = self.name.removeprefix("heads/").partition("/versions/")
        return f"{head}@{version}"


class Head(BaseModel):
    name: str = Field(description="heads/{head}")
    latest_version: int
    versions: list[HeadVersion]
    aliases: dict[str, int] = {}
    shadow_version: int | None = Field(
        None, description="a version that answers every prediction beside the served one, to be compared with it"
    )

    @property
    def display(self) -> str:
        """The bare head name, as predictions and the CLI use it."""
        return self.name.removeprefix("heads/")

    def version(self, ref: str | int | None = None) -> HeadVersion:
        """A version by number, alias or None (the latest), with its metrics' summary (``Client.get_head_version``
        has the whole)."""
        number = self.latest_version if ref in (None, "latest") else self.aliases.get(str(ref), ref)
        for version in self.versions:
            if str(version.version) == str(number):
                return version
        raise KeyError(f"{self.name} has no version or alias {ref!r}")


class PredictOptions(BaseModel):
    """What a predict call asks of every head, checked before it is sent. The client cannot import the server's
    model (service/prediction_options.py): tests/unit/test_prediction_options.py holds this copy to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a misspelt option fails instead of going unheard

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


class LabelScore(BaseModel):
    label: str
    score: float


class ExampleSuggestion(BaseModel):
    """An unlabelled example worth labelling next, and why."""

    example: DatasetExample
    score: float = Field(description="the strategy's ranking value, higher first; comparable within one answer only")
    margin: float = Field(description="the head's top probability minus its second: small is unsure")
    cluster: int | None = Field(None, description="the group of unsure images it stands for")
    reason: str
    likeliest: list[LabelScore] = Field([], description="the head's two likeliest labels for it")


class Suggestions(BaseModel):
    """A dataset's unlabelled examples worth labelling next for one head version, best first."""

    dataset: str = Field(description="datasets/{dataset}")
    head_version: str = Field(description="heads/{head}/versions/{version}")
    strategy: str | None = Field(
        None, description=f"{', '.join(SUGGESTION_STRATEGIES)}, or a strategy newer than this client"
    )
    pool_size: int = Field(0, description="unlabelled examples ranked")
    labelled_size: int = Field(0, description="labelled examples the picks were kept apart from")
    suggestions: list[ExampleSuggestion] = []


class HeadPrediction(BaseModel):
    head: str
    version: int
    top: list[LabelScore] = Field(description="calibrated scores, best first")
    abstained: bool = Field(False, description="the top score is below the request's min_score: treat as unknown")
    prediction_set: list[str] | None = Field(
        None, description="with coverage: labels holding the true one, likeliest first"
    )
    shadow: "HeadPrediction | None" = Field(
        None, description="with include_shadow: the head's shadow version's own answer (None: it has no shadow)"
    )


class ImagePrediction(BaseModel):
    heads: list[HeadPrediction]
    embedding: list[float] | None = None
    prediction_id: str | None = Field(
        None, description="names this answer when its true label is reported (report_feedback); None: not recorded"
    )


# Shadow versions, feedback and monitoring ---------------------------------------------------------------------------


class HeadComparison(BaseModel):
    """What a shadow version answered beside the served one, over every replica, since it was first attached."""

    served_version: int
    shadow_version: int
    compared: int = Field(0, description="images both versions answered")
    agreement: float | None = Field(None, description="share of those where both gave the same top label")
    mean_top_score_difference: float | None = Field(None, description="mean of shadow top score - served top score")
    labels: list[str] = []
    confusion: list[list[int]] = Field([], description="[i][j]: images served labelled labels[i], shadow labels[j]")
    labelled: int = Field(0, description="compared images whose true label was reported (feedback)")
    served_accuracy: float | None = None
    shadow_accuracy: float | None = None


class HeadComparisons(BaseModel):
    head: str
    comparisons: list[HeadComparison] = Field(
        [], description="one per (served, shadow) pair ever compared, newest first"
    )


class FeedbackVerdict(BaseModel):
    """Whether one head's answer to a reported prediction was right (and its shadow's, if it had one)."""

    head: str
    version: int
    correct: bool
    shadow_version: int | None = None
    shadow_correct: bool | None = None


class PredictionFeedback(BaseModel):
    prediction_id: str
    label: str
    heads: list[FeedbackVerdict] = []


class DriftTest(BaseModel):
    """A window's kernel two-sample test against the version's training features: drift when statistic > threshold."""

    statistic: float
    threshold: float = Field(description="the permutation statistics' 1 - alpha quantile")
    p_value: float
    drifting: bool = False
    window: int = Field(0, description="the window's images tested")
    test: str = Field("", description="which test (a newer server may name one this client does not know)")


class MonitorWindow(BaseModel):
    """One closed window of one replica's traffic to a head version."""

    end_time: datetime
    predictions: int = 0
    label_counts: list[int] = Field([], description="top labels answered, in the order of HeadMonitoring.labels")
    label_distance: float | None = Field(None, description="total variation distance from the training labels")
    confidence_histogram: list[int] = Field([], description="top scores in 10 bins of width 0.1")
    abstention_rate: float | None = None
    ood_rate: float | None = Field(None, description="share of images scored out of distribution; None: no reference")
    mean_ood_score: float | None = None
    drift: DriftTest | None = Field(None, description="None: no reference, or too few images")


class LiveAccuracy(BaseModel):
    labelled: int = Field(0, description="predictions whose true label was reported (feedback)")
    accuracy: float | None = None


class HeadMonitoring(BaseModel):
    """A head version's traffic window by window, and whether its inputs drifted from its training data."""

    head: str
    version: int
    status: str | None = Field(None, description=f"{', '.join(DRIFT_STATUSES)}, or a status newer than this client")
    drifting_since: datetime | None = Field(None, description="the end of the window that turned it drifting")
    evidence: MonitorWindow | None = Field(None, description="that window")
    reference: bool = Field(False, description="whether the version can be monitored for OOD images and drift")
    reference_note: str | None = Field(None, description="why it cannot")
    labels: list[str] = []
    training_label_distribution: list[float] = []
    live: LiveAccuracy = LiveAccuracy()
    windows: list[MonitorWindow] = Field([], description="oldest first")


class Tenant(BaseModel):
    name: str
    created_at: datetime | None = None


class NewKey(BaseModel):
    key_id: str
    tenant: str
    secret: str = Field(description="shown once: store it now")


class Webhook(BaseModel):
    name: str = Field(description="webhooks/{webhook}")
    url: str
    event_types: list[str] = Field(description=f"{', '.join(WEBHOOK_EVENTS)}, or a type newer than this client")
    description: str = ""
    create_time: datetime
    secret: str | None = Field(None, description="the signing secret: only in the answer to its creation")


class WebhookDelivery(BaseModel):
    name: str = Field(description="webhooks/{webhook}/deliveries/{delivery}")
    event_id: str
    event_type: str
    state: str = Field(description=f"{', '.join(DELIVERY_STATES)}, or a state newer than this client")
    attempts: int = 0
    last_status_code: int | None = Field(None, description="the receiver's last HTTP status; None: no answer")
    last_error: str | None = None
    create_time: datetime
    last_attempt_time: datetime | None = None
    next_attempt_time: datetime | None = None
    deliver_time: datetime | None = None
