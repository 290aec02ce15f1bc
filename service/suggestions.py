"""What to label next: a dataset's unlabelled images ranked for a head version (adapters/active.py).

The head scores every unlabelled image of the dataset (its probabilities, from
the features at its split point, through the feature cache), and the strategy
picks the ones a label would teach it most, skipping near-duplicates of each
other and of the dataset's labelled images (compared on pooled embeddings).

Bounds are an audit's: the dataset's size is bounded at upload; a worker runs at
most ``GRAFT_MAX_CONCURRENT_AUDITS`` audits and suggestions at once (the same
slots: both are feature extraction plus a little linear algebra), each for at
most ``GRAFT_MAX_AUDIT_SECONDS`` or until its caller goes away.
"""

import threading

import torch
from pydantic import BaseModel, Field

from adapters.active import DEFAULT_STRATEGY, Strategy, Suggestion, suggest
from adapters.kinds import HeadConfig
from service.engine.backbones import Backbone
from service.engine.extraction import FeatureExtractor
from service.engine.head_cache import LoadedHead, materialise
from service.errors import FailedPrecondition, InvalidArgument
from service.feature_work import audit_slot, check, stop_check
from service.store.datasets import DatasetStore, ExampleInfo
from service.store.heads import HeadRegistry, ServedVersion, imagenet_backbone
from service.training import adapter_errors_translated

DEFAULT_SUGGESTIONS = 20
SET_COVERAGE = 0.9  # the prediction sets set_size ranks by (a head calibrated on fewer images: the most it can)
MAX_SUGGESTIONS = 200


class SuggestRequest(BaseModel):
    """What a caller asks: which head judges the pool, how many images, by which strategy."""

    dataset_id: str
    head: str = Field(min_length=1, max_length=200)  # a head reference: name, name@3, name:alias
    count: int = Field(DEFAULT_SUGGESTIONS, ge=1, le=MAX_SUGGESTIONS)
    strategy: Strategy = Strategy(DEFAULT_STRATEGY)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class SuggestedExample(BaseModel):
    """One unlabelled example worth labelling, with the head's two likeliest labels and why it was chosen."""

    example: ExampleInfo
    suggestion: Suggestion
    likeliest: list[tuple[str, float]]  # the head's two likeliest classes and their probabilities


class Suggestions(BaseModel):
    dataset_id: str
    head: ServedVersion
    strategy: Strategy
    pool_size: int  # unlabelled examples ranked
    labelled_size: int  # labelled examples near-duplicates were checked against
    suggestions: list[SuggestedExample]


class ExampleSuggester:
    def __init__(
        self,
        datasets: DatasetStore,
        heads: HeadRegistry,
        extractor: FeatureExtractor,
        backbones: dict[str, Backbone],
        max_seconds: float,
    ) -> None:
        self.datasets = datasets
        self.heads = heads
        self.extractor = extractor
        self.backbones = backbones
        self.max_seconds = max_seconds  # GRAFT_MAX_AUDIT_SECONDS

    @adapter_errors_translated()
    def suggest(
        self,
        tenant: str,
        request: SuggestRequest,
        cancel: threading.Event | None = None,
        slots: threading.Semaphore | None = None,
    ) -> Suggestions:
        """Blocking (features may need the trunk): call it off the event loop. ``cancel`` and ``slots`` work as
        an audit's (service/auditing.py)."""
        self.datasets.get(tenant, request.dataset_id)  # NotFound first, for another tenant's too
        if imagenet_backbone(request.head) is not None:
            raise InvalidArgument(
                f"head '{request.head}' is a backbone's ImageNet classifier; suggestions need a head of yours, "
                "trained on labels like the ones you will give"
            )
        version = self.heads.resolve(tenant, request.head)
        backbone = self._backbone(version)
        if request.strategy.value == "set_size" and HeadConfig.model_validate(version.config).calibration is None:
            raise FailedPrecondition(
                f"head '{version.name}' version {version.version} has no conformal calibration (trained before "
                "graft calibrated heads), so strategy set_size cannot rank by prediction sets; train it again, or "
                "ask for diverse_margin"
            )
        pool = self.datasets.unlabelled_examples(tenant, request.dataset_id)
        if not pool:
            raise FailedPrecondition(
                f"dataset '{request.dataset_id}' has no unlabelled images to suggest from; upload images without "
                "labels to it (a pool), or create a dataset of them"
            )
        labelled = self.datasets.labelled_examples(tenant, request.dataset_id)
        stop = stop_check(cancel, self.max_seconds, "suggestion")
        with audit_slot(slots):
            head = materialise(version, self.heads.load_tensors(version), backbone)
            pool_shas = [example.image_sha256 for example in pool]
            shas = pool_shas + [e.image_sha256 for e in labelled]
            pooled = self.extractor.features(backbone, backbone.num_blocks, shas, tenant=tenant, cancelled=stop)
            check(stop, "suggestion")
            if head.split_point == backbone.num_blocks:  # the head reads the pooled features: read them once
                at_split = pooled[: len(pool)]
            else:
                at_split = self.extractor.features(backbone, head.split_point, pool_shas, tenant=tenant, cancelled=stop)
                check(stop, "suggestion")
            probabilities = head_probabilities(head, at_split, backbone.placement.device)
            picked = suggest(
                pooled[: len(pool)],
                probabilities,
                pooled[len(pool) :],
                request.count,
                strategy=request.strategy.value,
                classes=head.classes,
                seed=request.seed,
                set_threshold=_set_threshold(head),
            )
        return Suggestions(
            dataset_id=request.dataset_id,
            head=version,
            strategy=request.strategy,
            pool_size=len(pool),
            labelled_size=len(labelled),
            suggestions=[_suggested(pool[s.index], s, probabilities[s.index], head.classes) for s in picked],
        )

    def _backbone(self, version: ServedVersion) -> Backbone:
        if version.backbone not in self.backbones:
            raise FailedPrecondition(
                f"head '{version.name}' version {version.version} runs on backbone '{version.backbone}', which this "
                f"service does not load (it loads: {', '.join(sorted(self.backbones))})"
            )
        return self.backbones[version.backbone]


def _suggested(
    example: ExampleInfo, suggestion: Suggestion, probabilities: torch.Tensor, classes: tuple[str, ...]
) -> SuggestedExample:
    top = probabilities.topk(min(2, len(classes)))
    likeliest = [(classes[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
    return SuggestedExample(example=example, suggestion=suggestion, likeliest=likeliest)


def head_probabilities(head: LoadedHead, features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[N, C] calibrated probabilities of ``features`` (at the head's split point), as serving computes them."""
    with torch.inference_mode():
        return head.logits(features.to(device)).float().softmax(dim=1).cpu()


def _set_threshold(head: LoadedHead) -> float | None:
    """The head's conformal threshold at SET_COVERAGE (or the most its hold-out can promise); None: uncalibrated."""
    calibration = head.calibration
    if calibration is None:
        return None
    return calibration.threshold(min(SET_COVERAGE, calibration.max_coverage))
