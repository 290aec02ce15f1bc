"""The resources both doors serve, with the field names and meanings of protos/graft/v1 (the contract).

The HTTP door sends these models as JSON; the gRPC door builds its messages from
the same models (service/grpc/convert.py), so the two doors cannot drift apart,
and tests/unit/test_contract.py compares the OpenAPI document with the protos. Names
follow AIP-122: ``name`` is always a resource name (``datasets/{id}``,
``heads/{head}/versions/{version}``); what a person called a thing is
``display_name``. Enum values are lowercase here (``linear``, ``queued``) and
``HEAD_KIND_LINEAR`` / ``QUEUED`` in the protos.
"""

import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from adapters.active import Strategy
from adapters.kinds import AUTO_FINETUNE_MIN_PER_CLASS, KINDS, HeadKind
from adapters.recipe import ClassWeighting, Objective, Scaling
from adapters.search_space import SearchSpace
from service.auditing import AuditedDataset
from service.batch.store import BatchInfo, BatchOptions
from service.config import Settings
from service.engine.backbones import BACKBONES, BackboneInfo
from service.engine.predictor import ImagePrediction, LabelScore
from service.errors import InvalidArgument
from service.jobs import JobInfo, JobState
from service.kind_choice import AUTO_KIND, DEFAULT_TIME_BUDGET_S, MAX_TIME_BUDGET_S, auto_description
from service.store.datasets import MAX_CLIENT_ID_CHARS, MAX_LABEL_CHARS, MAX_NAME_CHARS, DatasetInfo, ExampleInfo
from service.store.heads import MAX_VERSION, NAME_PATTERN, HeadInfo, HeadVersionInfo
from service.store.observations import Comparison, Feedback
from service.store.windows import DriftStatus, MonitorWindow
from service.suggestions import Suggestions
from service.training import HyperParamOverrides, TrainRequest
from service.webhooks.addresses import MAX_URL_CHARS
from service.webhooks.events import SUBSCRIBABLE
from service.webhooks.outbox import DeliveryState
from service.webhooks.store import MAX_DESCRIPTION_CHARS, DeliveryInfo, WebhookInfo

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_REF_CHARS = 256
# Any backbone's bound; GET /v1/backbones/{backbone} shows each one's own (its split_points).
MAX_FINETUNE_BLOCKS = max(spec.max_finetune_blocks for spec in BACKBONES.values())

# One resource id: printable (PostgreSQL refuses NUL in text), no '/' (a name's separator) and no ':' (a custom
# method's, as in jobs/{job}:cancel).
ID_PATTERN = rf"^[^/:\x00-\x1f\x7f]{{1,{MAX_REF_CHARS}}}$"
HEAD_NAME_PATTERN = rf"^{NAME_PATTERN}$"
# An alias is a head name other than 'latest' (the implicit alias of the newest version): a JSON schema
# `not` says so, since pydantic's regex engine has no look-ahead.
ALIAS_PATTERN = HEAD_NAME_PATTERN
NOT_LATEST = {"not": {"const": "latest"}}


def decimal_pattern(limit: int) -> str:
    """A regex of the numbers 1 to ``limit`` written plainly: ASCII digits, no sign, no leading zero.

    Digits alone ([0-9]{1,10}) would let a schema promise 0 or 9999999999, which the server refuses.
    """
    digits = str(limit)
    options = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []  # fewer digits than ``limit``
    for i, digit in enumerate(digits):  # as many: its first i digits, a smaller next one, then any digits
        smaller = range(1 if i == 0 else 0, int(digit))
        if smaller:
            options.append(f"{digits[:i]}[{smaller[0]}-{smaller[-1]}][0-9]{{{len(digits) - i - 1}}}")
    return "(?:" + "|".join([*options, digits]) + ")"


VERSION_PATTERN = decimal_pattern(MAX_VERSION)
# A version of a tenant's head ('name', 'name@3', 'name:alias'): what export takes.
STORED_HEAD_REF_PATTERN = rf"^{NAME_PATTERN}(@{VERSION_PATTERN}|:{NAME_PATTERN})?$"
# That, maybe with 'heads/', or a backbone's own ImageNet classifier ('imagenet@mobilenet_v2'): what predictions take.
HEAD_REF_PATTERN = rf"^(heads/)?({STORED_HEAD_REF_PATTERN.strip('^$')}|imagenet@[a-z][a-z0-9_]{{0,62}})$"
# Display names and labels: some character that is not a space, and no control character (Unicode Cc).
DISPLAY_NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
# A page token is base64url (service/store/pages.py), opaque: only a next_page_token the service returned is valid.
PAGE_TOKEN_PATTERN = r"^[A-Za-z0-9_-]{0,4096}$"

ResourceId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
HeadName = Annotated[str, StringConstraints(pattern=HEAD_NAME_PATTERN)]
HeadRef = Annotated[str, StringConstraints(pattern=HEAD_REF_PATTERN)]
DisplayName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS, pattern=DISPLAY_NAME_PATTERN)]
Version = Annotated[int, Field(ge=1, le=MAX_VERSION)]

_HEAD_VERSION = re.compile(rf"heads/({NAME_PATTERN})/versions/([0-9]{{1,10}})")


def resource_id(name: str, collection: str) -> str:
    """'datasets/ds_1' -> 'ds_1'; a bare id is accepted too."""
    value = name.removeprefix(f"{collection}/")
    if re.fullmatch(ID_PATTERN.strip("^$"), value) is None:
        raise InvalidArgument(
            f"{name[:MAX_REF_CHARS]!r} is not a resource name of the form '{collection}/{{id}}' "
            f"(at most {MAX_REF_CHARS} printable characters, no '/' or ':')"
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


def head_ref(ref: str) -> str:
    """A head reference ('name', 'name@3', 'name:prod', maybe with 'heads/') as the core reads it."""
    if re.fullmatch(HEAD_REF_PATTERN.strip("^$"), ref) is None:
        raise InvalidArgument(
            f"head reference {ref[:MAX_REF_CHARS]!r} must be 'name', 'name@3', 'name:alias' (names match "
            f"{NAME_PATTERN}; versions are 1 to {MAX_VERSION}, with no leading zero) or a backbone's ImageNet "
            "classifier, 'imagenet@BACKBONE'"
        )
    return ref.removeprefix("heads/")


class Backbone(BackboneInfo):
    """``backbones/{backbone}``: a frozen, pretrained backbone heads are trained on; the engine's facts under
    its resource name."""

    @classmethod
    def of(cls, info: BackboneInfo) -> "Backbone":
        return cls(**(info.model_dump() | {"name": f"backbones/{info.name}"}))


class Dataset(BaseModel):
    """``datasets/{dataset}``: images owned by one tenant, labelled or not yet (a pool)."""

    name: str = Field(description="datasets/{dataset}")
    display_name: str
    create_time: datetime
    example_count: int
    classes: list[str] = Field(description="the labels its labelled examples have, sorted")
    examples_per_class: dict[str, int]
    labelled_example_count: int = Field(description="examples with a label: what training and audits use")
    unlabelled_example_count: int = Field(description="examples without a label yet, to label later")

    @classmethod
    def of(cls, info: DatasetInfo) -> "Dataset":
        return cls(
            name=f"datasets/{info.id}",
            display_name=info.name,
            create_time=info.created_at,
            example_count=info.num_examples,
            classes=info.classes,
            examples_per_class=info.counts,
            labelled_example_count=info.num_labelled,
            unlabelled_example_count=info.num_unlabelled,
        )


class Example(BaseModel):
    """``datasets/{dataset}/examples/{index}``: one image, its label (null: unlabelled) and the names its upload
    gave it."""

    name: str = Field(description="datasets/{dataset}/examples/{index}; the client id addresses it too")
    index: int = Field(description="its position in upload order, from 0")
    file_name: str | None = Field(
        description="the multipart file name, or the path inside the zip or folder; null for examples uploaded "
        "before graft kept names"
    )
    client_id: str | None = Field(description="the uploader's own id for it, unique within the dataset")
    label: str | None = Field(description="null: not labelled yet")
    image_sha256: str

    @classmethod
    def of(cls, dataset_id: str, info: ExampleInfo) -> "Example":
        return cls(name=f"datasets/{dataset_id}/examples/{info.index}", **info.model_dump())


class ExampleSuggestion(BaseModel):
    """An unlabelled example worth labelling next, and why."""

    example: Example
    score: float = Field(description="the strategy's ranking value, higher first; comparable within one answer only")
    margin: float = Field(description="the head's top probability minus its second: small is unsure")
    cluster: int | None = Field(None, description="the group of unsure images it stands for (diverse_margin)")
    reason: str
    likeliest: list[LabelScore] = Field(description="the head's two likeliest labels for it, with probabilities")


class SuggestExamplesResponse(BaseModel):
    """A dataset's unlabelled examples worth labelling next for one head version, best first."""

    dataset: str = Field(description="datasets/{dataset}")
    head_version: str = Field(description="heads/{head}/versions/{version}: the version that judged the pool")
    strategy: Strategy
    pool_size: int = Field(description="unlabelled examples ranked")
    labelled_size: int = Field(description="labelled examples of the dataset the picks were kept apart from")
    suggestions: list[ExampleSuggestion]

    @classmethod
    def of(cls, found: Suggestions) -> "SuggestExamplesResponse":
        return cls(
            dataset=f"datasets/{found.dataset_id}",
            head_version=f"heads/{found.head.name}/versions/{found.head.version}",
            strategy=found.strategy,
            pool_size=found.pool_size,
            labelled_size=found.labelled_size,
            suggestions=[
                ExampleSuggestion(
                    example=Example.of(found.dataset_id, s.example),
                    score=s.suggestion.score,
                    margin=s.suggestion.margin,
                    cluster=s.suggestion.cluster,
                    reason=s.suggestion.reason,
                    likeliest=[LabelScore(label=label, score=p) for label, p in s.likeliest],
                )
                for s in found.suggestions
            ],
        )


class AuditedExample(BaseModel):
    """One example of a dataset: its position in upload order, and the names its upload gave it."""

    index: int
    image_sha256: str
    label: str
    file_name: str | None = Field(description="as uploaded; null for examples uploaded before graft kept names")
    client_id: str | None = None


class LabelSuspect(BaseModel):
    """An example whose label is probably wrong: out-of-fold probabilities of its label and of the suggested one."""

    example: AuditedExample
    suggested_label: str
    label_score: float
    suggested_score: float


class DuplicatePair(BaseModel):
    """Two examples with (nearly) the same features filed under different labels."""

    first: AuditedExample
    second: AuditedExample
    similarity: float = Field(description="cosine similarity of the pooled features")
    identical: bool = Field(description="the same image bytes")


class DatasetAudit(BaseModel):
    """What a label audit found: complete counts, and the top of each ranking up to the limits asked for."""

    dataset: str = Field(description="datasets/{dataset}")
    backbone: str
    example_count: int
    folds: int
    class_thresholds: dict[str, float] = Field(
        description="per class, its mean probability over images filed under other labels: a label less "
        "probable than that makes its image a suspect"
    )
    suspect_count: int
    suspects: list[LabelSuspect] = Field(description="largest margin p(suggested) - p(label) first")
    duplicate_count: int
    duplicates: list[DuplicatePair] = Field(description="identical first, then most similar")
    duplicates_truncated: bool = Field(
        description="the duplicate search stopped after its bound on candidate pairs (a low duplicate_similarity): "
        "duplicate_count is then a lower bound"
    )

    @classmethod
    def of(cls, audited: AuditedDataset) -> "DatasetAudit":
        audit, classes = audited.audit, audited.classes

        def example(index: int) -> AuditedExample:
            return AuditedExample(**audited.examples[index].model_dump())

        return cls(
            dataset=f"datasets/{audited.dataset_id}",
            backbone=audited.backbone,
            example_count=len(audited.examples),
            folds=audit.folds,
            class_thresholds=dict(zip(classes, audit.thresholds, strict=True)),
            suspect_count=audit.suspect_count,
            suspects=[
                LabelSuspect(
                    example=example(s.index),
                    suggested_label=classes[s.suggested],
                    label_score=s.given_probability,
                    suggested_score=s.suggested_probability,
                )
                for s in audit.suspects
            ],
            duplicate_count=audit.duplicate_count,
            duplicates=[
                DuplicatePair(
                    first=example(d.first), second=example(d.second), similarity=d.similarity, identical=d.identical
                )
                for d in audit.duplicates
            ],
            duplicates_truncated=audit.duplicates_truncated,
        )


def _is(field: str, *values: object) -> dict:
    """JSON schema: ``field`` is present and one of ``values``."""
    return {"required": [field], "properties": {field: {"enum": list(values)}}}


def _only_with(field: str, is_set: dict, then: dict) -> dict:
    """JSON schema: when ``field`` is set (``is_set`` is its non-null schema), the whole must match ``then``."""
    return {"if": {"required": [field], "properties": {field: is_set}}, "then": then}


# Every head kind (the registry's, adapters/kinds.py), then 'auto'; mypy cannot see members made from data.
TrainingKind = Enum(  # type: ignore[misc]
    "TrainingKind", {**{kind.name: kind.value for kind in HeadKind}, AUTO_KIND.upper(): AUTO_KIND}, type=str
)
# Each value's one line, for whoever chooses a kind: the registry's, and auto's.
KIND_DESCRIPTIONS = {**{name: spec.description for name, spec in KINDS.items()}, AUTO_KIND: auto_description()}
TrainingKind.__doc__ = (
    "What a TrainingSpec may ask for: a head kind, or ``auto`` (request only: a version's kind is the winner's).\n\n"
    + "\n".join(f"- {name}: {description}" for name, description in KIND_DESCRIPTIONS.items())
)
_TAIL_KINDS = [spec.name for spec in KINDS.values() if spec.copies_tail]  # the kinds finetune_blocks applies to
_HIDDEN_LAYER_KINDS = [spec.name for spec in KINDS.values() if spec.hidden_layer]  # those search.hidden applies to
_UNSEARCHED_KINDS = [spec.name for spec in KINDS.values() if not spec.searched]  # those that take no search
_SCALED_KINDS = [spec.name for spec in KINDS.values() if spec.scalings]  # those scaling applies to
_WEIGHTED_KINDS = [spec.name for spec in KINDS.values() if spec.class_weighting is not None]  # and class_weighting
_DEFAULT_KIND = TrainRequest.model_fields["kind"].get_default().value  # what a spec without a kind trains


def _kind_is(*kinds: str) -> dict:
    """JSON schema: the kind is one of ``kinds``; an unset one (absent or null) is the default kind."""
    if _DEFAULT_KIND in kinds:
        return {"properties": {"kind": {"enum": [*kinds, None]}}}
    return _is("kind", *kinds)


class TrainingSpec(BaseModel):
    """What to train. Unset fields take the service's defaults (shown in the job's ``spec``)."""

    # The core's cross-field rules (TrainRequest), stated in the schema too.
    # allow_inf_nan: 1e999 (JSON) or inf (a gRPC double) is no budget, and PostgreSQL's JSON cannot store it
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "allOf": [
                _only_with(
                    "finetune_blocks",
                    {"type": "integer"},
                    {"anyOf": [_is("kind", *_TAIL_KINDS), _is("auto_finetune", True)]},
                ),
                _only_with("latency_budget_ms", {"type": "number"}, _is("backbone", "auto")),
                _only_with("time_budget_s", {"type": "number"}, _is("kind", AUTO_KIND)),
                _only_with("auto_finetune", {"type": "boolean"}, _is("kind", AUTO_KIND)),
                _only_with("scaling", {"type": "string"}, _kind_is(*_SCALED_KINDS, AUTO_KIND)),
                _only_with("class_weighting", {"type": "string"}, _kind_is(*_WEIGHTED_KINDS, AUTO_KIND)),
                _only_with(
                    "search",
                    {"type": "object", "required": ["hidden"], "properties": {"hidden": {"type": "array"}}},
                    _is("kind", *_HIDDEN_LAYER_KINDS),
                ),
                # kinds with nothing to search take no search or hyper-parameters; auto trains each with its defaults
                _only_with(
                    "kind",
                    {"enum": [*_UNSEARCHED_KINDS, AUTO_KIND]},
                    {"properties": {"search": {"type": "null"}, "hyperparams": {"type": "null"}}},
                ),
            ]
        },
    )

    dataset: Annotated[str, StringConstraints(pattern=rf"^(datasets/)?{ID_PATTERN.strip('^$')}$")] = Field(
        description="datasets/{dataset}"
    )
    head: HeadName = Field(description="the head to create a version of")
    backbone: str | None = Field(
        None,
        description="a backbone (GET /v1/backbones), or 'auto': the best cross-validated linear probe among them; "
        "default: the server's GRAFT_DEFAULT_BACKBONE (mobilenet_v2 unless configured)",
    )
    latency_budget_ms: float | None = Field(
        None, gt=0, description="backbone 'auto' only: leave out backbones slower than this per image"
    )
    # x-enumDescriptions (a vendor extension, as Redoc reads it): each kind's line, which the web page shows.
    kind: TrainingKind | None = Field(
        None, description="default linear", json_schema_extra={"x-enumDescriptions": {**KIND_DESCRIPTIONS}}
    )
    time_budget_s: float | None = Field(
        None, gt=0, le=MAX_TIME_BUDGET_S, description=f"kind 'auto' only: default {DEFAULT_TIME_BUDGET_S:g} s"
    )
    auto_finetune: bool | None = Field(
        None,
        description=f"kind 'auto' only: try finetune too, given {AUTO_FINETUNE_MIN_PER_CLASS}+ training images "
        "of every class",
    )
    finetune_blocks: int | None = Field(
        None, ge=1, le=MAX_FINETUNE_BLOCKS, description="finetune only: how many last blocks to train"
    )
    search: SearchSpace | None = Field(None, description="hyper-parameter grid; default: the kind's small grid")
    hyperparams: HyperParamOverrides | None = Field(
        None, description="fixed settings the search varies around; unset ones take the kind's defaults"
    )
    objective: Objective | None = Field(
        None,
        description="what 'best' means to every choice graft makes: accuracy (default) or balanced_accuracy; "
        "the version's metrics report both",
    )
    class_weighting: ClassWeighting | None = Field(
        None, description="none or balanced; default: linear searches both, mlp and finetune follow the objective"
    )
    scaling: Scaling | None = Field(
        None, description="linear and mlp: none, standardise or l2; default: linear searches all three"
    )
    holdout_fraction: float | None = Field(None, gt=0.0, lt=0.9)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    def request(self) -> TrainRequest:
        """The core's request: what is unset here takes TrainRequest's defaults."""
        fields = self.model_dump(mode="json", exclude_none=True, exclude={"dataset", "head"})
        return TrainRequest(dataset_id=resource_id(self.dataset, "datasets"), head_name=self.head, **fields)

    @classmethod
    def of(cls, request: TrainRequest) -> "TrainingSpec":
        """The spec with every default filled in; a TrainRequest field missing here fails (extra="forbid")."""
        fields = request.model_dump(exclude={"dataset_id", "head_name"}, exclude_none=True)
        return cls.model_validate(fields | {"dataset": f"datasets/{request.dataset_id}", "head": request.head_name})


class Job(BaseModel):
    """``jobs/{job}``: a training run, a long-running operation."""

    name: str = Field(description="jobs/{job}")
    state: JobState
    done: bool
    phase: str
    progress: float
    message: str
    spec: TrainingSpec
    metrics: dict[str, Any]
    head_version: str | None = Field(description="heads/{head}/versions/{version}, once the job succeeded")
    error: str | None
    create_time: datetime
    start_time: datetime | None
    end_time: datetime | None

    @classmethod
    def of(cls, info: JobInfo) -> "Job":
        return cls(
            name=f"jobs/{info.id}",
            state=info.state,
            done=info.done,
            phase=info.phase,
            progress=info.progress,
            message=info.message,
            spec=TrainingSpec.of(info.request),
            metrics=info.metrics,
            head_version=f"heads/{info.head}/versions/{info.head_version}" if info.head_version else None,
            error=info.error,
            create_time=info.created_at,
            start_time=info.started_at,
            end_time=info.finished_at,
        )


class BatchPredictionSpec(BatchOptions):
    """What a batch prediction answers: the body of ``POST /v1/batchPredictions``."""

    model_config = ConfigDict(extra="forbid")

    dataset: Annotated[str, StringConstraints(pattern=rf"^(datasets/)?{ID_PATTERN.strip('^$')}$")] = Field(
        description="datasets/{dataset}: every example of it is predicted, labelled or not"
    )
    # The schema states the default limit; GRAFT_MAX_BATCH_PREDICTION_HEADS changes it.
    heads: list[HeadRef] = Field(
        min_length=1,
        max_length=Settings.model_fields["max_batch_prediction_heads"].default,
        description="head references: 'name', 'name@3' or 'name:prod'",
    )

    def options(self) -> BatchOptions:
        return BatchOptions(top_k=self.top_k, min_score=self.min_score)


class BatchPrediction(BaseModel):
    """``batchPredictions/{batch_prediction}``: heads x a dataset, a long-running operation."""

    name: str = Field(description="batchPredictions/{batch_prediction}")
    spec: BatchPredictionSpec
    head_versions: list[str] = Field(description="each head reference as the version it named at creation: name@N")
    state: JobState
    done: bool
    images_done: int
    images_total: int
    error: str | None
    create_time: datetime
    start_time: datetime | None
    end_time: datetime | None

    @classmethod
    def of(cls, info: BatchInfo) -> "BatchPrediction":
        return cls(
            name=f"batchPredictions/{info.id}",
            spec=BatchPredictionSpec(
                dataset=f"datasets/{info.dataset_id}", heads=info.heads, **info.options.model_dump()
            ),
            head_versions=info.versions,
            state=info.state,
            done=info.done,
            images_done=info.done_images,
            images_total=info.total,
            error=info.error,
            create_time=info.created_at,
            start_time=info.started_at,
            end_time=info.finished_at,
        )


class HeadVersion(BaseModel):
    """``heads/{head}/versions/{version}``: one trained version of a head."""

    name: str = Field(description="heads/{head}/versions/{version}")
    version: int
    backbone: str
    split_point: int | None
    kind: HeadKind
    classes: list[str]
    hyperparams: dict[str, Any]
    metrics: dict[str, Any]
    dataset: str = Field(description="datasets/{dataset}")
    job: str | None = Field(description="jobs/{job}")
    param_bytes: int
    aliases: list[str]
    create_time: datetime

    @classmethod
    def of(cls, info: HeadVersionInfo) -> "HeadVersion":
        return cls(
            name=f"heads/{info.name}/versions/{info.version}",
            version=info.version,
            backbone=info.backbone,
            split_point=info.split_point,
            kind=HeadKind(info.kind),
            classes=info.classes,
            hyperparams=info.hyperparams,
            metrics=info.metrics,
            dataset=f"datasets/{info.dataset_id}",
            job=f"jobs/{info.job_id}" if info.job_id else None,
            param_bytes=info.param_bytes,
            aliases=info.aliases,
            create_time=info.created_at,
        )


class Head(BaseModel):
    """``heads/{head}``: a tenant's named head with its versions and aliases."""

    name: str = Field(description="heads/{head}")
    latest_version: int
    versions: list[HeadVersion]
    aliases: dict[str, int]
    shadow_version: int | None = Field(
        description="the version every prediction of this head also scores, to compare (GET :compare); null: none"
    )

    @classmethod
    def of(cls, info: HeadInfo) -> "Head":
        return cls(
            name=f"heads/{info.name}",
            latest_version=info.latest_version,
            versions=[HeadVersion.of(v) for v in info.versions],
            aliases=info.aliases,
            shadow_version=info.shadow_version,
        )


class HeadComparison(Comparison):
    """One (served version, shadow version) pair of a head, summed over every replica. ``confusion[i][j]``: images
    the served version labelled ``labels[i]`` and the shadow ``labels[j]``; accuracies are null until ``labelled``
    (compared images whose true label was reported) is above 0."""


class CompareHeadVersionsResponse(BaseModel):
    head: str = Field(description="the head's name")
    comparisons: list[HeadComparison] = Field(description="one per (served, shadow) pair ever compared, newest first")


class LiveAccuracy(BaseModel):
    labelled: int = Field(description="the version's predictions whose true label was reported (feedback)")
    accuracy: float | None = Field(description="the fraction of them it got right; null before any")


class HeadMonitoring(BaseModel):
    """How a head version's traffic compares with its training data, over every replica's closed windows."""

    head: str = Field(description="the head's name")
    version: int
    status: DriftStatus = Field(
        description="'drifting' from the first window whose drift test rejected the training distribution "
        "until cleared (POST :clearDrift); the OOD rate alone never alarms"
    )
    drifting_since: datetime | None = Field(description="the end of the window that turned it drifting")
    evidence: MonitorWindow | None = Field(description="that window")
    reference: bool = Field(
        description="whether the version has a monitoring reference (OOD scores and drift tests); without one, "
        "windows still count labels, confidences and abstentions"
    )
    reference_note: str | None = Field(description="why it has none")
    labels: list[str] = Field(description="the version's classes: the order of label counts and distributions")
    training_label_distribution: list[float] | None = Field(description="its training labels' shares; null: none")
    live: LiveAccuracy
    windows: list[MonitorWindow] = Field(
        description="every replica's closed windows, oldest first: the newest GRAFT_MONITOR_WINDOWS_KEPT"
    )


class ExportFormat(str, Enum):
    """What a head is exported as: its weights alone, or a model file of backbone + head(s) to run without graft."""

    SAFETENSORS = "safetensors"
    ONNX = "onnx"
    PT2 = "pt2"


REMOVED_EXPORT_FORMATS = {
    "torchscript": "TorchScript export was removed (torch 2.14 deprecates TorchScript); "
    "use 'pt2' (torch.export, load with torch.export.load) or 'onnx'"
}


class ExportedHead(BaseModel):
    """A head as a file: what ExportHead streams and ``GET /v1/heads/{ref}:export`` downloads."""

    file_name: str
    data: bytes


class ListBackbonesResponse(BaseModel):
    backbones: list[Backbone]


class ListDatasetsResponse(BaseModel):
    datasets: list[Dataset]
    next_page_token: str = Field("", description="pass as page_token for the next page; empty on the last")


class ListExamplesResponse(BaseModel):
    examples: list[Example]
    next_page_token: str = Field("", description="pass as page_token for the next page; empty on the last")


class ExampleUpdate(BaseModel):
    """A PATCH of an example: of its fields only ``label`` can change (the others are ignored)."""

    label: str | None = Field(max_length=MAX_LABEL_CHARS, description="null or empty: unlabel it")


class ExampleLabel(BaseModel):
    """One example's new label (:batchUpdate)."""

    example: str = Field(max_length=MAX_CLIENT_ID_CHARS, description="its client id, or its position (from 0)")
    label: str | None = Field(max_length=MAX_LABEL_CHARS, description="null or empty: unlabel it")


class BatchUpdateExamplesRequest(BaseModel):
    updates: list[ExampleLabel] = Field(min_length=1, description="at most GRAFT_MAX_LABEL_UPDATES; all apply or none")


class BatchUpdateExamplesResponse(BaseModel):
    examples: list[Example] = Field(description="as they are now, in the order of the updates")


class ImportLabelsResponse(BaseModel):
    row_count: int = Field(description="the rows applied")
    dataset: Dataset = Field(description="the dataset after them")


class ListJobsResponse(BaseModel):
    jobs: list[Job]
    next_page_token: str = Field("", description="pass as page_token for the next page; empty on the last")


class ListBatchPredictionsResponse(BaseModel):
    batch_predictions: list[BatchPrediction]
    next_page_token: str = Field("", description="pass as page_token for the next page; empty on the last")


class ListHeadsResponse(BaseModel):
    heads: list[Head]
    next_page_token: str = Field("", description="pass as page_token for the next page; empty on the last")


class PredictResponse(BaseModel):
    predictions: list[ImagePrediction]


class PredictionFeedback(Feedback):
    """What a reported true label said of each head version (and its shadow) that answered the prediction."""


class CreateWebhookRequest(BaseModel):
    """A webhook to register: where to POST which events (docs/webhooks.md)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=MAX_URL_CHARS,
        description="http:// or https://, no credentials; its host must resolve to public addresses unless the "
        "operator allowed its network (GRAFT_WEBHOOK_ALLOWED_NETWORKS)",
    )
    event_types: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        min_length=1,
        max_length=len(SUBSCRIBABLE),
        description=f"any of: {', '.join(e.value for e in SUBSCRIBABLE)}",
    )
    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS)


class Webhook(BaseModel):
    """``webhooks/{webhook}``: a tenant's endpoint for its events, signed with ``secret``."""

    name: str = Field(description="webhooks/{webhook}")
    url: str
    event_types: list[str]
    description: str
    create_time: datetime
    secret: str | None = Field(
        None, description="the signing secret: only in the answer to its creation, never again; keep it then"
    )

    @classmethod
    def of(cls, info: WebhookInfo, secret: str | None = None) -> "Webhook":
        return cls(
            name=f"webhooks/{info.id}",
            url=info.url,
            event_types=info.events,
            description=info.description,
            create_time=info.created_at,
            secret=secret,
        )


class WebhookDelivery(BaseModel):
    """``webhooks/{webhook}/deliveries/{delivery}``: one event sent (or being sent) to one webhook."""

    name: str = Field(description="webhooks/{webhook}/deliveries/{delivery}; {delivery} is the Graft-Delivery header")
    event_id: str
    event_type: str
    state: DeliveryState
    attempts: int
    last_status_code: int | None = Field(description="the receiver's last HTTP status; null: no answer")
    last_error: str | None
    create_time: datetime
    last_attempt_time: datetime | None
    next_attempt_time: datetime | None = Field(description="when it is tried next, while pending")
    deliver_time: datetime | None

    @classmethod
    def of(cls, info: DeliveryInfo) -> "WebhookDelivery":
        return cls(
            name=f"webhooks/{info.webhook_id}/deliveries/{info.id}",
            event_id=info.event_id,
            event_type=info.event_type,
            state=DeliveryState(info.state),
            attempts=info.attempts,
            last_status_code=info.last_status_code,
            last_error=info.last_error,
            create_time=info.created_at,
            last_attempt_time=info.last_attempt_at,
            next_attempt_time=info.next_attempt_at,
            deliver_time=info.delivered_at,
        )


class ListWebhooksResponse(BaseModel):
    webhooks: list[Webhook]
    next_page_token: str = Field("", description="pass as page_token for the next page; empty on the last")


class ListWebhookDeliveriesResponse(BaseModel):
    deliveries: list[WebhookDelivery]
    next_page_token: str = Field("", description="pass as page_token for the next page; empty on the last")
