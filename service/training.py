"""The transfer-learning recipe, end to end, for one dataset and one head.

dataset -> cached trunk features at the split point -> stratified hold-out ->
hyper-parameter search (each trial trained on the train part, scored on the
hold-out; a linear head on a small train part is scored by k folds of it
instead) -> metrics of the best trial on the hold-out -> a new head version.

Jobs (background, cancellable, with progress) call :meth:`Trainer.train`; so do
benchmarks and tests, directly.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator
from sqlalchemy.orm import Session

from adapters.crossval import Choice, choose, cross_validate_linear
from adapters.errors import AdapterError, InvalidInput, TrainingCancelled
from adapters.heads import HeadConfig, HeadKind, head_state
from adapters.metrics import evaluate, finite
from adapters.splits import stratified_split
from adapters.trainer import HyperParams, ProgressEvent, class_weights_for, default_hyperparams
from adapters.tuning import SearchSpace, default_search_space, tune
from service.engine.backbones import Backbone
from service.engine.extraction import FeatureExtractor
from service.errors import Cancelled, FailedPrecondition, GraftError, InvalidArgument
from service.store.datasets import DatasetStore
from service.store.heads import HeadRegistry, HeadVersionInfo

DEFAULT_FINETUNE_BLOCKS = 4
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

    dataset_id: str
    head_name: str
    backbone: str = Field(
        "mobilenet_v2", description="a loaded backbone, or 'auto': the best cross-validated linear probe among them"
    )
    latency_budget_ms: float | None = Field(
        None, gt=0, description="backbone 'auto' only: leave out backbones slower than this per image here"
    )
    kind: HeadKind = HeadKind.LINEAR
    finetune_blocks: int | None = Field(None, description="finetune only: how many last blocks to train (default 4)")
    search: SearchSpace | None = Field(None, description="hyper-parameter grid; default: the kind's small grid")
    hyperparams: HyperParamOverrides | None = Field(
        None, description="fixed settings the search varies around; unset ones take the kind's defaults"
    )
    holdout_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> "TrainRequest":
        if self.finetune_blocks is not None and self.kind != HeadKind.FINETUNE:
            raise ValueError("finetune_blocks applies to kind 'finetune' only")
        if self.search is not None and self.search.hidden is not None and self.kind != HeadKind.MLP:
            raise ValueError("search.hidden applies to kind 'mlp' only")
        if self.latency_budget_ms is not None and self.backbone != AUTO:
            raise ValueError("latency_budget_ms applies to backbone 'auto' only")
        return self

    @property
    def epochs(self) -> int:
        return self.hyperparameters().epochs

    def hyperparameters(self) -> HyperParams:
        """The kind's defaults with the client's overrides on top, checked together."""
        overrides = self.hyperparams.model_dump(exclude_none=True) if self.hyperparams else {}
        return HyperParams(**(default_hyperparams(self.kind).model_dump() | overrides))

    @property
    def trials(self) -> int:
        return (self.search or default_search_space(self.kind)).trials


class TrainingCost(BaseModel):
    """What one run of a request costs, in the unit ``GRAFT_MAX_JOB_WORK`` bounds."""

    epochs: int
    images: int  # the whole dataset: an upper bound on the training split
    trials: int

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
    ) -> None:
        self.backbones = backbones
        self.datasets = datasets
        self.extractor = extractor
        self.heads = heads

    def backbone(self, name: str) -> Backbone:
        try:
            return self.backbones[name]
        except KeyError:
            raise InvalidArgument(
                f"backbone '{name}' is not loaded by this service; loaded: {', '.join(sorted(self.backbones))}"
            ) from None

    def candidates(self, request: TrainRequest) -> list[Backbone]:
        """The backbones a request may train on: the one it names, or for 'auto' every pretrained one loaded."""
        if request.backbone != AUTO:
            return [self.backbone(request.backbone)]
        pretrained = [backbone for backbone in self.backbones.values() if backbone.spec.pretrained]
        if not pretrained:
            raise FailedPrecondition(
                f"backbone 'auto' chooses among pretrained backbones, and this service loads none "
                f"(loaded: {', '.join(sorted(self.backbones))}); set GRAFT_BACKBONES"
            )
        return pretrained

    def split_point(self, request: TrainRequest, backbone: Backbone) -> int:
        if request.kind == HeadKind.FINETUNE:
            return backbone.split_for_blocks(request.finetune_blocks or DEFAULT_FINETUNE_BLOCKS)
        return backbone.num_blocks

    def cost(self, tenant: str, request: TrainRequest) -> TrainingCost:
        """Check what would only fail later (backbone, finetune_blocks, dataset) and price one run."""
        for backbone in self.candidates(request):
            self.split_point(request, backbone)
        dataset = self.datasets.get(tenant, request.dataset_id)  # NotFound, for another tenant's too
        return TrainingCost(epochs=request.epochs, images=dataset.num_examples, trials=request.trials)

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
        for candidate in candidates:
            self.split_point(request, candidate)
        dataset = self.datasets.get(tenant, request.dataset_id)
        examples = self.datasets.examples(tenant, request.dataset_id)
        class_index = {name: i for i, name in enumerate(dataset.classes)}
        labels = torch.tensor([class_index[label] for _, label in examples])
        train_idx, holdout_idx = stratified_split(labels.tolist(), request.holdout_fraction, request.seed)
        if len(holdout_idx) == 0:  # checked before the costly extraction
            raise FailedPrecondition("dataset too small for a hold-out split: add at least 2 examples per class")

        shas = [sha for sha, _ in examples]
        # 'auto' extracts for every candidate, then for the winner: each its slice of the extraction share.
        slices = len(candidates) + 1 if request.backbone == AUTO else 1

        def extraction_progress(part: int, name: str) -> Callable[[int, int], None]:
            def report_part(done: int, total: int) -> None:
                # Counts over all the dataset's images, cached or not: the cache is shared
                # across tenants, and "new images" would tell that another tenant has them.
                report(
                    ProgressEvent(
                        phase="extract",
                        fraction=EXTRACTION_SHARE * (part + done / total) / slices,
                        message=f"features for {done}/{total} images" + (f" ({name})" if slices > 1 else ""),
                    )
                )

            return report_part

        choice = None
        if request.backbone == AUTO:
            choice = self._choose_backbone(
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
        split = self.split_point(request, backbone)
        features = self.extractor.features(
            backbone, split, shas, progress=extraction_progress(slices - 1, backbone.name), cancelled=cancelled
        )
        base = request.hyperparameters()
        finetune = request.kind == HeadKind.FINETUNE
        config = HeadConfig.model_validate(
            {  # validated: dropout takes the kind's default
                "kind": request.kind,
                "in_features": int(features.shape[1]),
                "num_classes": len(dataset.classes),
                "hidden": base.hidden if request.kind == HeadKind.MLP else None,
                "tail_blocks": backbone.num_blocks - split if finetune else None,
                "tail_out_channels": backbone.spec.feature_dim if finetune else None,
            }
        )
        tail_factory = (lambda: backbone.fresh_tail(split)) if finetune else None

        def training_progress(event: ProgressEvent) -> None:
            report(event.model_copy(update={"fraction": EXTRACTION_SHARE + (1 - EXTRACTION_SHARE) * event.fraction}))

        x_train, y_train = features[train_idx], labels[train_idx]
        x_holdout, y_holdout = features[holdout_idx], labels[holdout_idx]
        result = tune(
            config,
            x_train,
            y_train,
            x_holdout,
            y_holdout,
            space=request.search or default_search_space(request.kind),
            base=base,
            tail_factory=tail_factory,
            class_weights=class_weights_for(y_train, config.num_classes),
            progress=training_progress,
            cancelled=cancelled,
            seed=request.seed,  # the folds 'auto' chose by: a named backbone and 'auto' get the same head
        )
        head = result.head.eval()
        with torch.no_grad():
            metrics = evaluate(head(x_holdout), y_holdout, dataset.classes)
        report(ProgressEvent(phase="save", fraction=1.0, message="saving head", metrics={"accuracy": metrics.accuracy}))
        return self.heads.create_version(
            tenant,
            request.head_name,
            tensors=head_state(head),
            backbone=backbone.name,
            split_point=split,
            kind=request.kind.value,
            classes=dataset.classes,
            config=result.config.model_dump(mode="json"),
            hyperparams=result.best.model_dump(mode="json"),
            metrics=finite(
                {**metrics.model_dump(mode="json"), "trials": [t.model_dump(mode="json") for t in result.trials]}
                | (choice_metrics(choice) | {"backbone_choice": choice.model_dump(mode="json")} if choice else {})
            ),
            dataset_id=dataset.id,
            job_id=job_id,
            guard=guard,
        )

    def _choose_backbone(
        self,
        request: TrainRequest,
        candidates: list[Backbone],
        shas: list[str],
        y_train: torch.Tensor,
        train_idx: np.ndarray,
        num_classes: int,
        extraction_progress: Callable[[int, str], Callable[[int, int], None]],
        report: Progress,
        cancelled: Callable[[], bool] | None,
    ) -> Choice:
        """'auto': k-fold cross-validate a linear probe on each candidate's pooled features of the training split.

        The hold-out split stays out of it, so the metrics reported for the
        winner are as honest as with a named backbone. The features land in the
        cache, so the winner's training reads them back instead of running its trunk again.
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
        scores = {}
        for part, backbone in enumerate(candidates):
            pooled = self.extractor.features(
                backbone,
                backbone.num_blocks,
                shas,
                progress=extraction_progress(part, backbone.name),
                cancelled=cancelled,
            )
            scores[backbone.name] = cross_validate_linear(
                pooled[train_idx], y_train, num_classes, seed=request.seed, cancelled=cancelled
            )
        choice = choose(scores, {backbone.name: backbone.spec.gflops for backbone in candidates})
        report(
            ProgressEvent(
                phase="choose",
                fraction=EXTRACTION_SHARE * len(candidates) / (len(candidates) + 1),
                message=choice.reason,
                metrics=choice_metrics(choice),
            )
        )
        return choice


def choice_metrics(choice: Choice) -> dict[str, float]:
    """Each candidate's cross-validated linear-probe accuracy and spread, as the job's numeric metrics."""
    metrics = {}
    for name, score in choice.scores.items():
        metrics[f"cv_accuracy_{name}"] = score.mean
        metrics[f"cv_std_{name}"] = score.std
    return metrics
