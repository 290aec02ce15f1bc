"""The transfer-learning recipe, end to end, for one dataset and one head.

dataset -> cached trunk features at the split point -> stratified hold-out ->
hyper-parameter search (each trial trained on the train part, scored on the
hold-out; a linear head on a small train part is scored by k folds of it
instead) -> metrics of the best trial on the hold-out -> a new head version.

Jobs (background, cancellable, with progress) call :meth:`Trainer.train`; so do
benchmarks and tests, directly.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator
from sqlalchemy.orm import Session

from adapters.audit import OutOfFold, audit_labels, audit_summary
from adapters.calibration import Calibration, calibrate, calibration_report
from adapters.crossval import (
    Choice,
    Evidence,
    FoldScores,
    RecipeSearch,
    best_mean,
    fold_count,
    fold_of,
    fold_scores,
    search_linear,
)
from adapters.errors import AdapterError, InvalidInput, TrainingCancelled
from adapters.heads import LinearHead, head_state
from adapters.kinds import KINDS, HeadConfig, HeadKind, HeadKindSpec, build_head, get_kind, load_head
from adapters.metrics import evaluate, finite
from adapters.monitoring import MonitoringReference
from adapters.recipe import ClassWeighting, Objective, Scaling, class_weights, get_objective
from adapters.search_space import SearchSpace
from adapters.splits import stratified_split
from adapters.trainer import (
    HyperParams,
    ProgressEvent,
    predict_logits,
)
from adapters.tuning import TuneResult, fit_recipe, tune
from service.engine.backbones import Backbone
from service.engine.extraction import FeatureExtractor
from service.errors import Cancelled, FailedPrecondition, GraftError, InvalidArgument, NotFound
from service.kind_choice import (
    AUTO_KIND,
    DEFAULT_TIME_BUDGET_S,
    MAX_TIME_BUDGET_S,
    AutoKind,
    Budget,
    KindCandidate,
    KindChoice,
    auto_candidates,
    auto_description,
    choose_kind,
    kind_choice_metrics,
    kinds_to_try,
)
from service.labelled_set import LabelledSet, labelled_set
from service.store.datasets import DatasetStore, ExampleInfo
from service.store.heads import HeadRegistry, HeadVersionInfo

DEFAULT_FINETUNE_BLOCKS = 4
AUDIT_TOP = 5  # suspects and duplicates a version's metrics name; the counts are complete
AUTO = "auto"  # the `backbone` that asks graft to choose, by cross-validated linear probes


class HyperParamOverrides(BaseModel):
    """The hyper-parameters a client wants changed; the others keep the kind's defaults (same bounds as HyperParams)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    lr: float | None = Field(None, gt=0.0, le=10.0)
    weight_decay: float | None = Field(None, ge=0.0, le=10.0)
    epochs: int | None = Field(None, ge=1, le=500)
    batch_size: int | None = Field(None, ge=1, le=4096)
    hidden: int | None = Field(None, ge=1, le=8192)
    label_smoothing: float | None = Field(None, ge=0.0, lt=0.5)
    patience: int | None = Field(None, ge=1, le=500)


class TrainRequest(BaseModel):
    """What a client asks for when it wants a head trained."""

    # inf and nan are never a budget or a fraction; stored as JSON they would be "Infinity", which PostgreSQL refuses
    model_config = ConfigDict(allow_inf_nan=False)

    dataset_id: str
    head_name: str
    backbone: str | None = Field(
        None,
        description="a loaded backbone, or 'auto': the best cross-validated linear probe among them; "
        "unset: the server's GRAFT_DEFAULT_BACKBONE",
    )
    latency_budget_ms: float | None = Field(
        None, gt=0, description="backbone 'auto' only: leave out backbones slower than this per image here"
    )
    kind: HeadKind | AutoKind = Field(HeadKind("linear"), description=f"a head kind, or 'auto': {auto_description()}")
    time_budget_s: float | None = Field(
        None, gt=0, le=MAX_TIME_BUDGET_S, description=f"kind 'auto' only: default {DEFAULT_TIME_BUDGET_S:g} s"
    )
    auto_finetune: bool | None = Field(
        None, description="kind 'auto' only: try finetune too, when every class has enough training examples"
    )
    finetune_blocks: int | None = Field(None, description="finetune only: how many last blocks to train (default 4)")
    search: SearchSpace | None = Field(None, description="hyper-parameter grid; default: the kind's small grid")
    hyperparams: HyperParamOverrides | None = Field(
        None, description="fixed settings the search varies around; unset ones take the kind's defaults"
    )
    objective: Objective = Field(
        Objective("accuracy"),
        description="what 'best' means to every choice graft makes: accuracy (on data distributed like the "
        "upload) or balanced_accuracy (every class counts the same); reports show both",
    )
    class_weighting: ClassWeighting | None = Field(
        None,
        description="none or balanced; unset: linear searches both (the objective's own wins a tie), "
        "mlp and finetune take the objective's (balanced for balanced_accuracy)",
    )
    scaling: Scaling | None = Field(
        None,
        description="kinds linear and mlp: none, standardise or l2; unset: linear searches all three, mlp standardises",
    )
    holdout_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> "TrainRequest":
        if self.finetune_blocks is not None and not any(get_kind(kind).copies_tail for kind in self.kinds):
            tails = _kinds_where(lambda spec: spec.copies_tail)
            raise ValueError(f"finetune_blocks applies to kind {tails} (or 'auto' with auto_finetune) only")
        for field in ("time_budget_s", "auto_finetune"):
            if getattr(self, field) is not None and self.kind != AUTO_KIND:
                raise ValueError(f"{field} applies to kind 'auto' only")
        if (self.kind == AUTO_KIND or not get_kind(self.kind).searched) and (self.search or self.hyperparams):
            closed_forms = _kinds_where(lambda spec: not spec.searched)
            raise ValueError(
                f"kind {closed_forms} has no hyper-parameters, and 'auto' trains each kind with its defaults: "
                "leave search and hyperparams unset, or name a kind to tune"
            )
        searches_hidden = self.search is not None and self.search.hidden is not None
        if searches_hidden and not all(get_kind(kind).hidden_layer for kind in self.kinds):
            raise ValueError(f"search.hidden applies to kind {_kinds_where(lambda spec: spec.hidden_layer)} only")
        if self.latency_budget_ms is not None and self.backbone != AUTO:
            raise ValueError("latency_budget_ms applies to backbone 'auto' only")
        if self.scaling is not None and not any(get_kind(kind).scalings for kind in self.kinds):
            raise ValueError(f"scaling applies to kind {_kinds_where(lambda spec: bool(spec.scalings))} only")
        if self.class_weighting is not None and not any(get_kind(kind).class_weighting for kind in self.kinds):
            raise ValueError(
                f"class_weighting applies to kind {_kinds_where(lambda spec: spec.class_weighting is not None)} only"
            )
        return self

    def scalings(self, kind: HeadKind) -> list[str]:
        """The scalings the kind trains with, simplest first: the one asked for, else the kind's own."""
        spec = get_kind(kind)
        if not spec.scalings:
            return []
        return [self.scaling.value] if self.scaling is not None else list(spec.scalings)

    def class_weightings(self, kind: HeadKind) -> list[str]:
        """The class weightings the kind trains with: the one asked for, else both for a kind that searches
        them, else the objective's."""
        spec = get_kind(kind)
        if spec.class_weighting is None:
            return []
        if self.class_weighting is not None:
            return [self.class_weighting.value]
        preferred = get_objective(self.objective).class_weighting
        if spec.class_weighting == "searched":
            return [preferred] + [w.value for w in ClassWeighting if w.value != preferred]
        return [preferred]

    @property
    def kinds(self) -> list[HeadKind]:
        """The kinds this request may train: the one it names, or auto's candidates."""
        if self.kind == AUTO_KIND:
            return auto_candidates(bool(self.auto_finetune))
        return [HeadKind(self.kind)]

    @property
    def epochs(self) -> int:
        """The most epochs any trial runs (an upper bound on the work of each)."""
        return max(self.hyperparameters(kind).epochs for kind in self.kinds)

    def hyperparameters(self, kind: HeadKind) -> HyperParams:
        """The kind's defaults with the client's overrides on top, checked together."""
        overrides = self.hyperparams.model_dump(exclude_none=True) if self.hyperparams else {}
        return HyperParams(**(get_kind(kind).hyperparams.model_dump() | overrides))

    @property
    def trials(self) -> int:
        return sum((self.search or get_kind(kind).search_space).trials for kind in self.kinds)


# Copies of a split point's features a run holds at its peak: the extractor's per-image tensors and their stack
# (service/engine/extraction.py), then the stack beside its train and hold-out parts indexed from it (_fit).
FEATURE_COPIES = 3
FEATURE_BYTES = 4  # float32: the extractor hands back what the cache stores as float16, widened


class FeatureMemory(BaseModel):
    """The largest features one run holds: those of one image at one split point of one backbone, x images."""

    backbone: str
    split: str  # the feature-cache key: 'pooled' or 'block<k>'
    elements: int  # values per image at that split point
    bytes: int  # images x elements x FEATURE_BYTES x FEATURE_COPIES


class TrainingCost(BaseModel):
    """What one run of a request costs: ``work`` in the unit ``GRAFT_MAX_JOB_WORK`` bounds, ``memory`` in bytes
    that ``GRAFT_MAX_JOB_MEMORY_BYTES`` bounds."""

    epochs: int
    images: int  # the whole dataset: an upper bound on the training split
    trials: int
    memory: FeatureMemory

    @computed_field  # type: ignore[prop-decorator]
    @property
    def work(self) -> int:
        return self.epochs * self.images * self.trials


Progress = Callable[[ProgressEvent], None]
# Called inside the transaction that stores the new head version; raising aborts it.
PublishGuard = Callable[[Session], None]

# Share of a job's progress bar spent extracting features (the rest is training).
EXTRACTION_SHARE = 0.5

# The core's error for each kind of error adapters raise (adapters/errors.py); one not listed is internal.
_ADAPTER_ERRORS: dict[type[AdapterError], type[GraftError]] = {
    InvalidInput: InvalidArgument,
    TrainingCancelled: Cancelled,
    AdapterError: GraftError,
}


@contextmanager
def adapter_errors_translated() -> Iterator[None]:
    """Adapters know nothing of the service: their errors become the core's taxonomy here, in one place.

    Works as a ``with`` block and as a decorator (``@adapter_errors_translated()``).
    """
    try:
        yield
    except AdapterError as error:
        kind = next(cls for cls in type(error).__mro__ if cls in _ADAPTER_ERRORS)
        raise _ADAPTER_ERRORS[kind](error.message, **error.details) from error


class Trainer:
    def __init__(
        self,
        backbones: dict[str, Backbone],
        datasets: DatasetStore,
        extractor: FeatureExtractor,
        heads: HeadRegistry,
        default_backbone: str,
    ) -> None:
        self.backbones = backbones
        self.default_backbone = default_backbone  # GRAFT_DEFAULT_BACKBONE: for a request that names none
        self.datasets = datasets
        self.extractor = extractor
        self.heads = heads

    def backbone(self, name: str) -> Backbone:
        """The loaded backbone ``name``; one this service does not load is not found, as GET /v1/backbones/{name}."""
        try:
            return self.backbones[name]
        except KeyError:
            raise NotFound(
                f"backbone '{name}' is not loaded by this service; loaded: {', '.join(sorted(self.backbones))}"
            ) from None

    def candidates(self, request: TrainRequest) -> list[Backbone]:
        """The backbones a request may train on: the one it names, or for 'auto' every pretrained one loaded."""
        if request.backbone != AUTO:
            return [self.backbone(request.backbone or self.default_backbone)]
        pretrained = [backbone for backbone in self.backbones.values() if backbone.spec.pretrained]
        if not pretrained:
            raise FailedPrecondition(
                f"backbone 'auto' chooses among pretrained backbones, and this service loads none "
                f"(loaded: {', '.join(sorted(self.backbones))}); set GRAFT_BACKBONES"
            )
        return pretrained

    def split_point(self, request: TrainRequest, backbone: Backbone, kind: HeadKind) -> int:
        """Where the kind's head reads the trunk: where its copied tail starts, else the pooled features."""
        if get_kind(kind).copies_tail:
            return backbone.split_for_blocks(request.finetune_blocks or DEFAULT_FINETUNE_BLOCKS)
        return backbone.num_blocks

    def check_split_points(self, request: TrainRequest, backbones: list[Backbone]) -> None:
        """Fail now on a split point (finetune_blocks) one of the request's kinds could not use later."""
        for backbone in backbones:
            for kind in request.kinds:
                self.split_point(request, backbone, kind)

    def cost(self, tenant: str, request: TrainRequest) -> TrainingCost:
        """Check what would only fail later (backbone, finetune_blocks, dataset) and price one run."""
        candidates = self.candidates(request)
        self.check_split_points(request, candidates)
        dataset = self.datasets.get(tenant, request.dataset_id)  # NotFound, for another tenant's too
        if len(dataset.classes) < 2:  # refused now rather than when the job runs (which checks again)
            labelled_set(self.datasets, tenant, request.dataset_id)
        images = dataset.num_examples  # labelled or not: a bound however the dataset is labelled meanwhile
        return TrainingCost(
            epochs=request.epochs,
            images=images,
            trials=request.trials,
            memory=max(
                (
                    self.feature_memory(backbone, self.split_point(request, backbone, kind), images)
                    for backbone in candidates
                    for kind in request.kinds
                ),
                key=lambda memory: memory.bytes,
            ),
        )

    @staticmethod
    def feature_memory(backbone: Backbone, split: int, images: int) -> FeatureMemory:
        """What a run at ``split`` holds in features: kinds and 'auto' candidates run one after another, so a
        request's peak is its largest split point's (a fine-tune's block maps, not the pooled vectors)."""
        elements = backbone.feature_elements(split)
        return FeatureMemory(
            backbone=backbone.name,
            split=Backbone.split_key(split, backbone.num_blocks),
            elements=elements,
            bytes=images * elements * FEATURE_BYTES * FEATURE_COPIES,
        )

    @adapter_errors_translated()
    def train(
        self,
        tenant: str,
        request: TrainRequest,
        *,
        job_id: str | None = None,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] | None = None,
        guard: PublishGuard | None = None,
    ) -> HeadVersionInfo:
        """Train and store a new head version; ``guard`` may veto storing it (a job that lost its lease)."""
        report = progress or (lambda event: None)
        candidates = self.candidates(request)
        self.check_split_points(request, candidates)
        dataset = labelled_set(self.datasets, tenant, request.dataset_id)  # what this version learns from
        examples = dataset.examples
        labels = torch.tensor(dataset.labels)
        train_idx, holdout_idx = stratified_split(labels.tolist(), request.holdout_fraction, request.seed)
        if len(holdout_idx) == 0 and all(get_kind(kind).searched for kind in request.kinds):  # before extracting
            raise FailedPrecondition(
                "dataset too small for a hold-out split: add at least 2 examples per class, "
                f"or train kind {_kinds_where(lambda spec: not spec.searched)} (or 'auto'), which learns from one"
            )

        shas = [example.image_sha256 for example in examples]
        # 'auto' extracts for every candidate, then for the winner: each its slice of the extraction share.
        slices = len(candidates) + 1 if request.backbone == AUTO else 1

        def extraction_progress(part: int, name: str) -> Callable[[int, int], None]:
            def report_part(done: int, total: int) -> None:
                # Counts over all the dataset's images, cached or not: the same messages whatever was cached.
                report(
                    ProgressEvent(
                        phase="extract",
                        fraction=EXTRACTION_SHARE * (part + done / total) / slices,
                        message=f"features for {done}/{total} images" + (f" ({name})" if slices > 1 else ""),
                    )
                )

            return report_part

        choice = known = None
        if request.backbone == AUTO:
            choice, known = self._choose_backbone(
                tenant,
                request,
                candidates,
                shas,
                labels[train_idx],
                train_idx,
                len(dataset.classes),
                extraction_progress,
                report,
                cancelled,
            )
            backbone = self.backbone(choice.chosen)
        else:
            backbone = candidates[0]

        def training_progress(event: ProgressEvent) -> None:
            report(event.model_copy(update={"fraction": EXTRACTION_SHARE + (1 - EXTRACTION_SHARE) * event.fraction}))

        data = _Examples(tenant, backbone, shas, labels, train_idx, holdout_idx, len(dataset.classes), examples)
        pooled_progress = extraction_progress(slices - 1, backbone.name)
        kind_choice = None
        if request.kind == AUTO_KIND:
            fitted, kind_choice = self._choose_kind(request, data, pooled_progress, training_progress, cancelled, known)
        else:
            kind = HeadKind(request.kind)
            fitted = self._fit(
                request,
                data,
                kind,
                pooled_progress,
                training_progress,
                cancelled,
                known if get_kind(kind).cross_validate else None,
            )
        result = fitted.result
        served = self._served_head(request, data, fitted, dataset.classes, cancelled)
        calibration = fitted.calibration(data, request.seed, refit=served is not result.head)
        metrics = fitted.metrics(data, dataset.classes, calibration)
        audit = self._audit(request, data, fitted, dataset, report, cancelled)
        report(
            ProgressEvent(
                phase="save",
                fraction=1.0,
                message="saving head",
                metrics={"accuracy": metrics["accuracy"]} if "accuracy" in metrics else {},
            )
        )
        return self.heads.create_version(
            tenant,
            request.head_name,
            tensors=head_state(served),
            backbone=backbone.name,
            split_point=fitted.split,
            kind=result.config.kind.value,
            classes=dataset.classes,
            config=result.config.model_copy(update={"calibration": calibration}).model_dump(mode="json"),
            hyperparams=result.best.model_dump(mode="json"),
            metrics=finite(
                {
                    **metrics,
                    "trials": [t.model_dump(mode="json") for t in result.trials],
                    "trunk": backbone.numeric_path(fitted.split),  # the features it was trained on
                    "objective": request.objective.value,
                    "recipe": _recipe_report(result),
                    "served": "the chosen recipe fit on every example, hold-out included; the metrics above are "
                    "the same recipe's, fit without the hold-out and measured on it"
                    if served is not result.head
                    else "the head measured above",
                }
                | (choice_metrics(choice) | {"backbone_choice": choice.model_dump(mode="json")} if choice else {})
                | (
                    kind_choice_metrics(kind_choice) | {"kind_choice": kind_choice.model_dump(mode="json")}
                    if kind_choice
                    else {}
                )
                | ({"audit": audit} if audit else {})
                | dataset.record()
            ),
            dataset_id=dataset.dataset_id,
            job_id=job_id,
            guard=guard,
            monitoring=data.monitoring(fitted.split, fitted.features, request.seed),
        )

    def _served_head(
        self,
        request: TrainRequest,
        data: "_Examples",
        fitted: "_Fitted",
        classes: list[str],
        cancelled: Callable[[], bool] | None,
    ) -> torch.nn.Module:
        """The head to store: a cross-validated kind's chosen recipe refit on every example, else the head as fit.

        The k folds chose the recipe on the training split and the hold-out has
        measured and calibrated it; nothing is left to choose, so the served
        head learns from every image the client gave (a fifth more by default),
        as scikit-learn's searches refit their winner. A kind searched on the
        hold-out keeps the head the hold-out chose.
        """
        result = fitted.result
        if result.search is None or len(data.holdout_idx) == 0 or not isinstance(result.head, LinearHead):
            return result.head
        return fit_recipe(
            result.config,
            fitted.features,
            data.labels.to(fitted.features.device),
            result.best,
            result.class_weighting or "none",
            start=self._previous_linear_head(data, request.head_name, fitted, classes) or result.head,
            cancelled=cancelled,
            seed=request.seed,
        )

    def _previous_linear_head(
        self, data: "_Examples", head_name: str, fitted: "_Fitted", classes: list[str]
    ) -> LinearHead | None:
        """The head's latest version if it is a linear head of the same scaling on the same features and classes:
        where a refit starts, since a retrain's optimum is the same or near it. None otherwise."""
        try:
            latest = self.heads.resolve(data.tenant, head_name)
        except NotFound:
            return None
        config = fitted.result.config
        same = (latest.backbone, latest.split_point, latest.classes) == (data.backbone.name, fitted.split, classes)
        if not same or latest.kind != config.kind.value or latest.config.get("scaling") != config.scaling:
            return None
        head = load_head(HeadConfig.model_validate(latest.config), self.heads.load_tensors(latest))
        return head if isinstance(head, LinearHead) and head.linear.in_features == config.in_features else None

    def _linear_search(
        self,
        request: TrainRequest,
        tenant: str,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        cancelled: Callable[[], bool] | None,
    ) -> RecipeSearch:
        """The linear recipe's k-fold search of x, y as ``request`` asks for it: what 'auto' compares kinds and
        backbones by, with the options a named linear head searches with (tune), so its verdict serves both."""
        linear = HeadKind("linear")
        space = request.search if request.kind == linear and request.search else get_kind(linear).search_space
        return search_linear(
            x,
            y,
            num_classes,
            scalings=request.scalings(linear),
            class_weightings=request.class_weightings(linear),
            weight_decays=space.weight_decay,
            objective=request.objective.value,
            seed=request.seed,
            evidence=self._kept_search(tenant, request.head_name),
            cancelled=cancelled,
        )

    def _kept_search(self, tenant: str, head_name: str) -> Evidence:
        """Looks up the recipe search kept in the head's latest version by its key (`search_linear`): a retrain on
        the same features with the same options rereads its evidence instead of searching again."""

        def lookup(key: str) -> dict | None:
            try:
                recipe = self.heads.describe(tenant, head_name).metrics.get("recipe") or {}
            except NotFound:
                return None
            return recipe if recipe.get("key") == key else None

        return lookup

    def _audit(
        self,
        request: TrainRequest,
        data: "_Examples",
        fitted: "_Fitted",
        dataset: LabelledSet,
        report: Progress,
        cancelled: Callable[[], bool] | None,
    ) -> dict | None:
        """The label audit's summary for the version's metrics, when the head was trained on pooled features.

        It reads the pooled features the head was trained on. A head chosen by
        k folds shares them: each training example's probabilities come from
        the search's fold that left it out, each hold-out example's from the
        head (which never saw it), so the audit fits nothing of its own. A
        finetune head's job skips it rather than pool again.
        """
        if fitted.split != data.backbone.num_blocks or min(dataset.counts.values()) < 2:  # 2 folds need 2 per class
            return None
        report(ProgressEvent(phase="audit", fraction=1.0, message="auditing the labels"))
        search = fitted.result.search
        shared = None
        if search is not None and fitted.holdout_logits is not None:
            probabilities = torch.empty(len(data.labels), data.num_classes)
            probabilities[data.train_idx] = search.out_of_fold_logits.softmax(dim=1)
            probabilities[data.holdout_idx] = fitted.holdout_logits.float().cpu().softmax(dim=1)
            shared = OutOfFold(probabilities=probabilities, folds=search.folds, weight_decay=search.chosen.weight_decay)
        found = audit_labels(
            fitted.features,
            data.labels,
            data.num_classes,
            keys=data.shas,
            max_suspects=AUDIT_TOP,
            max_duplicates=AUDIT_TOP,
            seed=request.seed,
            cancelled=cancelled,
            out_of_fold=shared,
        )
        summary = audit_summary(found, dataset.classes, AUDIT_TOP)
        for suspect in summary["suspects"]:  # named as uploaded, so a person can find the file to fix
            example = data.examples[suspect["index"]]
            suspect["index"], suspect["file_name"], suspect["client_id"] = (
                example.index,
                example.file_name,
                example.client_id,
            )
        return summary

    def _fit(
        self,
        request: TrainRequest,
        data: "_Examples",
        kind: HeadKind,
        extraction: Callable[[int, int], None] | None,
        progress: Progress,
        cancelled: Callable[[], bool] | None,
        known: RecipeSearch | None = None,
    ) -> "_Fitted":
        """One kind: its features (from the cache when there), its search, its hold-out logits.

        With no hold-out (no class has two examples) a kind with nothing to
        search (train admits no other here) is fit on every example. ``known``:
        the k-fold search 'auto' already ran for it on these examples.
        """
        spec = get_kind(kind)
        backbone = data.backbone
        split = self.split_point(request, backbone, kind)
        features = self.extractor.features(
            backbone, split, data.shas, tenant=data.tenant, progress=extraction, cancelled=cancelled
        )
        base = request.hyperparameters(kind)
        config = _head_config(request, backbone, kind, split, int(features.shape[1]), data.num_classes)
        tail_factory = (lambda: backbone.fresh_tail(split)) if spec.copies_tail else None
        x_train, y_train = features[data.train_idx], data.labels[data.train_idx]
        if len(data.holdout_idx) == 0:
            head = build_head(config, tail_factory() if tail_factory is not None else None)
            spec.fit(head, x_train, y_train, base, cancelled=cancelled, seed=request.seed)
            result = TuneResult(head=head.eval(), config=config, best=base, trials=[], class_weighting=None)
            return _Fitted(result, split, None, features)
        x_holdout = features[data.holdout_idx]
        result = tune(
            config,
            x_train,
            y_train,
            x_holdout,
            data.labels[data.holdout_idx],
            space=request.search or spec.search_space,
            base=base,
            tail_factory=tail_factory,
            objective=request.objective.value,
            scalings=request.scalings(kind),
            class_weightings=request.class_weightings(kind),
            known=known,
            evidence=self._kept_search(data.tenant, request.head_name),
            progress=progress,
            cancelled=cancelled,
            seed=request.seed,  # the folds 'auto' chose by: a named backbone and 'auto' get the same head
        )
        return _Fitted(result, split, predict_logits(result.head, x_holdout), features)

    def _choose_kind(
        self,
        request: TrainRequest,
        data: "_Examples",
        pooled_progress: Callable[[int, int], None],
        progress: Progress,
        cancelled: Callable[[], bool] | None,
        known: RecipeSearch | None,
    ) -> tuple["_Fitted", KindChoice]:
        """kind 'auto': each candidate kind scored by the same k folds, cheapest first, within the time budget
        (service/kind_choice.py); then the chosen kind is trained as if it had been named.

        The pooled features are extracted before the clock starts: the budget
        is for training, and every kind but finetune reads them from the cache.
        """
        budget_s = request.time_budget_s or DEFAULT_TIME_BUDGET_S
        counts = torch.bincount(data.labels[data.train_idx], minlength=data.num_classes).tolist()
        kinds, left_out = kinds_to_try(bool(request.auto_finetune), counts)
        if len(data.holdout_idx) == 0 or min(counts) < 2:
            unsearched = next(kind for kind in kinds if not get_kind(kind).searched)  # else train refused the request
            fitted = self._fit(request, data, unsearched, pooled_progress, progress, cancelled)
            why = "no folds to compare kinds on (a class has fewer than two training examples)"
            candidates = [KindCandidate(kind=unsearched, status="trained", note="fit without comparison")]
            candidates += [KindCandidate(kind=kind, status="skipped", note=why) for kind in kinds if kind != unsearched]
            candidates += left_out
            reason = f"{unsearched.value}: {why}; it is the kind that learns from one example per class"
            return fitted, KindChoice(chosen=unsearched, reason=reason, time_budget_s=budget_s, candidates=candidates)
        backbone = data.backbone
        self.extractor.features(
            backbone, backbone.num_blocks, data.shas, tenant=data.tenant, progress=pooled_progress, cancelled=cancelled
        )
        budget = Budget(budget_s, cancelled)
        searches: dict[HeadKind, RecipeSearch] = {}
        candidates = []
        for index, kind in enumerate(kinds):
            if index > 0 and budget.spent():
                candidates.append(KindCandidate(kind=kind, status="over_budget", note="not started: budget spent"))
                continue
            started = time.monotonic()
            check = budget.check if index > 0 else cancelled  # the first kind always runs to the end
            try:
                scores, search = self._cross_validate_kind(request, data, kind, check, known)
            except (Cancelled, TrainingCancelled):
                if budget.cancelled():
                    raise
                seconds = time.monotonic() - started
                candidates.append(KindCandidate(kind=kind, status="over_budget", seconds=seconds, note="stopped"))
                continue
            if search is not None:
                searches[kind] = search
            candidate = KindCandidate(kind=kind, status="trained", scores=scores, seconds=time.monotonic() - started)
            candidates.append(candidate)
            progress(
                ProgressEvent(
                    phase="auto",
                    fraction=(index + 1) / (len(kinds) + 1),
                    message=f"{kind.value}: {request.objective.value} {scores.shown()} in {candidate.seconds:.1f} s",
                    metrics={f"auto_score_{kind.value}": scores.mean, f"auto_seconds_{kind.value}": candidate.seconds},
                )
            )
        choice = choose_kind(candidates + left_out, budget_s)
        progress(
            ProgressEvent(
                phase="choose",
                fraction=len(kinds) / (len(kinds) + 1),
                message=choice.reason,
                metrics=kind_choice_metrics(choice),
            )
        )

        def last_part(event: ProgressEvent) -> None:
            fraction = (len(kinds) + event.fraction) / (len(kinds) + 1)
            progress(
                event.model_copy(update={"fraction": fraction, "message": f"{choice.chosen.value}: {event.message}"})
            )

        fitted = self._fit(request, data, choice.chosen, None, last_part, cancelled, searches.get(choice.chosen))
        return fitted, choice

    def _cross_validate_kind(
        self,
        request: TrainRequest,
        data: "_Examples",
        kind: HeadKind,
        cancelled: Callable[[], bool] | None,
        known: RecipeSearch | None,
    ) -> tuple[FoldScores, RecipeSearch | None]:
        """The kind's k-fold scores on the training split: a kind that cross-validates its recipe (linear) by its
        own search (its verdict's folds), the others fit with their defaults on each fold."""
        spec = get_kind(kind)
        backbone = data.backbone
        split = self.split_point(request, backbone, kind)
        features = self.extractor.features(backbone, split, data.shas, tenant=data.tenant, cancelled=cancelled)
        x, y = features[data.train_idx], data.labels[data.train_idx]
        if spec.cross_validate:
            search = known or self._linear_search(request, data.tenant, x, y, data.num_classes, cancelled)
            return search.chosen.scores, search
        config = _head_config(request, backbone, kind, split, int(features.shape[1]), data.num_classes)
        weightings = request.class_weightings(kind)
        folds = fold_count(y)
        assignment = fold_of(y, folds, request.seed)
        predicted = torch.empty(len(y), dtype=torch.int64)
        for fold in range(folds):
            fit, val = assignment != fold, assignment == fold
            weights = class_weights(y[fit], data.num_classes, weightings[0]) if weightings else None
            torch.manual_seed(request.seed)
            head = build_head(config, backbone.fresh_tail(split) if spec.copies_tail else None)
            spec.fit(
                head,
                x[fit],
                y[fit],
                request.hyperparameters(kind),
                class_weights=None if weights is None else weights.to(x.device),
                cancelled=cancelled,
                seed=request.seed,
            )
            predicted[val] = predict_logits(head, x[val]).argmax(1).cpu()
        return fold_scores(predicted, y.cpu(), assignment, folds, data.num_classes, request.objective.value), None

    def _choose_backbone(
        self,
        tenant: str,
        request: TrainRequest,
        candidates: list[Backbone],
        shas: list[str],
        y_train: torch.Tensor,
        train_idx: np.ndarray,
        num_classes: int,
        extraction_progress: Callable[[int, str], Callable[[int, int], None]],
        report: Progress,
        cancelled: Callable[[], bool] | None,
    ) -> tuple[Choice, RecipeSearch]:
        """'auto': each candidate's linear recipe searched by k folds of its pooled features of the training split;
        the backbone with the best mean wins, the cheapest (GFLOPs) on a tie (`best_mean`).

        The hold-out split stays out of it, so the metrics reported for the
        winner are as honest as with a named backbone. The features land in the
        cache, so the winner's training reads them back instead of running its
        trunk again, and a linear head reuses the winner's search.
        """
        if request.latency_budget_ms is not None:
            measured = {backbone.name: backbone.latency_ms() for backbone in candidates}
            candidates = [b for b in candidates if measured[b.name] <= request.latency_budget_ms]
            if not candidates:
                shown = ", ".join(f"{name} {ms:.0f} ms" for name, ms in sorted(measured.items()))
                raise FailedPrecondition(
                    f"no backbone runs one image within latency_budget_ms={request.latency_budget_ms:g} here "
                    f"(measured: {shown}); raise the budget or name a backbone"
                )
        searches = {}
        for part, backbone in enumerate(candidates):
            pooled = self.extractor.features(
                backbone,
                backbone.num_blocks,
                shas,
                tenant=tenant,
                progress=extraction_progress(part, backbone.name),
                cancelled=cancelled,
            )
            searches[backbone.name] = self._linear_search(
                request, tenant, pooled[train_idx], y_train, num_classes, cancelled
            )
        cheapest_first = [backbone.name for backbone in sorted(candidates, key=lambda b: (b.spec.gflops, b.name))]
        scores = {name: search.chosen.scores for name, search in searches.items()}
        choice = best_mean(scores, cheapest_first, what="cheapest")
        report(
            ProgressEvent(
                phase="choose",
                fraction=EXTRACTION_SHARE * len(candidates) / (len(candidates) + 1),
                message=choice.reason,
                metrics=choice_metrics(choice),
            )
        )
        return choice, searches[choice.chosen]


@dataclass(frozen=True)
class _Examples:
    """One run's examples on its backbone: what every kind's fit reads (``tenant``: whose feature cache)."""

    tenant: str
    backbone: Backbone
    shas: list[str]
    labels: torch.Tensor
    train_idx: np.ndarray
    holdout_idx: np.ndarray
    num_classes: int
    examples: list[ExampleInfo]  # position and names per example, for the audit's findings

    def monitoring(self, split: int, features: torch.Tensor, seed: int) -> dict[str, torch.Tensor] | None:
        """The version's monitoring reference (``MonitoringReference.to_tensors``), fitted on the pooled features
        of its training split and hold-out: the space serving observes. None for a head that reads the trunk
        before its end (a fine-tune: serving never computes its pooled features) or with too few examples."""
        if split != self.backbone.num_blocks:
            return None
        train = torch.as_tensor(self.train_idx, dtype=torch.long)
        holdout = torch.as_tensor(self.holdout_idx, dtype=torch.long)
        try:
            reference = MonitoringReference.fit(
                features[train], self.labels[train], features[holdout], self.num_classes, seed=seed
            )
        except InvalidInput:
            return None
        return reference.to_tensors()


@dataclass(frozen=True)
class _Fitted:
    """A kind's best head, where it splits the backbone, its hold-out logits (None: no hold-out), and the
    features of every example at the split it read (the audit reads pooled ones again rather than reload them)."""

    result: TuneResult
    split: int
    holdout_logits: torch.Tensor | None
    features: torch.Tensor

    def calibration(self, data: _Examples, seed: int, refit: bool) -> Calibration | None:
        """Temperature and conformal scores fitted on logits of examples their model never saw (None: no hold-out).

        The hold-out's, from the head as fit; for a head ``refit`` on every
        example, every example's: the search's out-of-fold logits on the
        training split and the hold-out's, as scikit-learn's
        CalibratedClassifierCV calibrates a classifier refit on all its data.
        """
        if self.holdout_logits is None:
            return None
        logits, labels = self.holdout_logits.float().cpu(), data.labels[data.holdout_idx]
        if refit and self.result.search is not None:
            logits = torch.cat([self.result.search.out_of_fold_logits, logits])
            labels = torch.cat([data.labels[data.train_idx], labels])
        return calibrate(logits, labels, seed=seed)

    def metrics(self, data: _Examples, classes: list[str], calibration: Calibration | None) -> dict[str, Any]:
        """The hold-out evaluation; without a hold-out, a note that says so instead of made-up numbers.

        The metrics describe the scores clients get: the calibrated ones.
        """
        if self.holdout_logits is None or calibration is None:
            return {"num_examples": 0, "holdout": "none: no class has two examples, so every one trained the head"}
        y_holdout = data.labels[data.holdout_idx]
        calibrated = evaluate(self.holdout_logits / calibration.temperature, y_holdout, classes)
        return calibrated.model_dump(mode="json") | {
            "calibration": calibration_report(self.holdout_logits, y_holdout, calibration)
        }


def _recipe_report(result: TuneResult) -> dict[str, Any]:
    """The version's recipe and how it was chosen: the k-fold evidence and rule when the kind cross-validates."""
    chosen = {
        "scaling": result.config.scaling.value if result.config.scaling else None,
        "class_weighting": result.class_weighting,
        "weight_decay": result.best.weight_decay,
    }
    if result.search is None:
        return {"chosen": chosen, "rule": "the best trial on the hold-out" if len(result.trials) > 1 else "fixed"}
    return result.search.report() | {"chosen": chosen}


def _head_config(
    request: TrainRequest, backbone: Backbone, kind: HeadKind, split: int, in_features: int, num_classes: int
) -> HeadConfig:
    """The shape of the kind's head on ``backbone`` at ``split`` (validated: dropout takes the kind's default)."""
    spec = get_kind(kind)
    return HeadConfig.model_validate(
        {
            "kind": kind,
            "in_features": in_features,
            "num_classes": num_classes,
            "hidden": request.hyperparameters(kind).hidden if spec.hidden_layer else None,
            "scaling": request.scalings(kind)[0] if spec.scalings else None,
            "tail_blocks": backbone.num_blocks - split if spec.copies_tail else None,
            "tail_out_channels": backbone.spec.feature_dim if spec.copies_tail else None,
        }
    )


def _kinds_where(has: Callable[[HeadKindSpec[Any]], bool]) -> str:
    """The kinds whose record ``has`` it, quoted for a message: 'finetune', or 'a' or 'b'."""
    return " or ".join(f"'{spec.name}'" for spec in KINDS.values() if has(spec))


def choice_metrics(choice: Choice) -> dict[str, float]:
    """Each backbone's cross-validated linear-recipe score (the objective) and spread, as numeric metrics."""
    metrics = {}
    for name, scores in choice.scores.items():
        metrics[f"cv_score_{name}"] = scores.mean
        metrics[f"cv_std_{name}"] = scores.std
    return metrics
