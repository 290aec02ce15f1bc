"""The engine's predict API: images x head references -> top-k labels per image per head.

Both doors call :meth:`Predictor.predict`. The tenant's prediction rate is
charged after the cheap shape checks; heads are resolved and loaded next (so a
bad reference fails before any image is decoded), and references naming the
same version (``h``, ``h@1``, ``h:latest``, an alias) run as one head. Every
image goes through its backbone's shared batcher once, however many heads it
asks for.

Throughput must stay flat however many requests are in flight, so two bounds
hold: images are decoded in a small pool of their own (half the cores), never
in as many threads as there are requests fighting the trunk for the same cores;
and the images admitted (decoding, queued or in a batch) never exceed
``GRAFT_MAX_QUEUE_IMAGES``: beyond that a request is refused at once with
"resource exhausted" (HTTP 429, gRPC RESOURCE_EXHAUSTED) instead of waiting.

A replica that only trains (``GRAFT_ROLE=train``) is never ready, so no load
balancer sends it predictions; one that reaches it anyway is refused here, for
both doors, with "unavailable" (HTTP 503, gRPC UNAVAILABLE) before anything
is checked or charged.
"""

import asyncio
import functools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from pydantic import BaseModel, Field

from adapters.calibration import prediction_set
from service.config import Settings
from service.engine.backbones import Backbone
from service.engine.batcher import Batcher
from service.engine.device import use_one_torch_thread
from service.engine.head_cache import HeadCache, HeadKey, LoadedHead
from service.engine.preprocess import prepare_image
from service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from service.prediction_options import DEFAULT_OPTIONS, PredictOptions
from service.quotas import PredictionRate

TRAINING_ONLY = (
    "this replica only trains (GRAFT_ROLE=train) and takes no predictions; "
    "send predictions to a serving replica (GRAFT_ROLE=serve or both)"
)


class LabelScore(BaseModel):
    label: str
    score: float


class HeadPrediction(BaseModel):
    """One head version's answer for one image."""

    head: str
    version: int
    top: list[LabelScore]
    abstained: bool = Field(
        False, description="the top score is below the request's min_score: do not act on `top` unchecked"
    )
    prediction_set: list[str] | None = Field(
        None, description="with `coverage`: the labels that contain the true one with that probability, likeliest first"
    )
    shadow: "HeadPrediction | None" = Field(
        None, description="with `include_shadow`: the head's shadow version's own answer (null: it has none)"
    )


class ImagePrediction(BaseModel):
    heads: list[HeadPrediction]
    embedding: list[float] | None = None
    prediction_id: str | None = Field(
        None,
        description="report this image's true label with POST /v1/predictions/{prediction_id}:feedback, "
        "within GRAFT_PREDICTION_TTL_S",
    )


@dataclass(frozen=True)
class Served:
    """One distinct head version of a request and what it, and its head's shadow version, answered per image."""

    head: LoadedHead
    shadow: LoadedHead | None
    answers: list[HeadPrediction]
    shadow_answers: list[HeadPrediction] | None  # None: no shadow (or it could not run on this backbone)


class PredictionObserver(Protocol):
    """What watches every answered request (service/monitoring.py): comparisons, prediction ids, monitoring."""

    @property
    def keeps_embeddings(self) -> bool:
        """Whether to hand back the pooled features a batch computed anyway (monitoring is on)."""
        ...

    def observe(self, tenant: str, served: list[Served], embeddings: dict[str, torch.Tensor]) -> list[str]:
        """Record one request (``embeddings``: per backbone, [images, D], where every image's was computed);
        answer each image's prediction id."""
        ...


class EngineMetrics(Protocol):
    """Where the engine reports what it does (Prometheus in the service; nothing in tests)."""

    def batch(self, backbone: str, size: int, queue_depth: int) -> None: ...

    def predictions(self, kind: str, door: str, count: int) -> None: ...


def thresholds(heads: list[LoadedHead], coverage: float | None) -> dict[HeadKey, float]:
    """Each head's conformal threshold for the requested coverage; none asked, none computed."""
    if coverage is None:
        return {}
    out = {}
    for head in heads:
        calibration = head.calibration
        if calibration is None:
            raise FailedPrecondition(
                f"head '{head.name}' version {head.version} has no hold-out calibration (an ImageNet head, or "
                "trained before graft calibrated heads), so it cannot promise a coverage; train it again",
                head=head.name,
                version=head.version,
            )
        if coverage > calibration.max_coverage:
            n = len(calibration.scores)
            raise FailedPrecondition(
                f"head '{head.name}' version {head.version} was calibrated on {n} hold-out images: it can promise "
                f"a coverage of at most {calibration.max_coverage:.4f} (n/(n+1)), not {coverage:g}; ask for "
                "less, or train it on more images",
                head=head.name,
                version=head.version,
                max_coverage=calibration.max_coverage,
            )
        out[head.key] = calibration.threshold(coverage)
    return out


def head_prediction(
    head: LoadedHead, logits: torch.Tensor, threshold: float | None, options: PredictOptions
) -> HeadPrediction:
    """The head's answer for one image (its logits are already temperature-scaled: head_cache.py)."""
    scores = torch.softmax(logits.float(), dim=0)
    best = scores.topk(min(options.top_k, scores.shape[0]))
    return HeadPrediction(
        head=head.name,
        version=head.version,
        top=[LabelScore(label=head.classes[i], score=float(s)) for s, i in zip(best.values, best.indices, strict=True)],
        abstained=float(best.values[0]) < options.min_score,
        prediction_set=None if threshold is None else [head.classes[i] for i in prediction_set(scores, threshold)],
    )


class Predictor:
    def __init__(
        self,
        backbones: dict[str, Backbone],
        heads: HeadCache,
        settings: Settings,
        metrics: EngineMetrics | None = None,
        observer: PredictionObserver | None = None,
    ) -> None:
        self.backbones = backbones
        self.heads = heads
        self.settings = settings
        self.metrics = metrics
        self.observer = observer
        self.rate = PredictionRate(settings)
        self.batchers = {
            name: Batcher(
                backbone,
                max_batch_size=settings.max_batch_size or backbone.placement.serving_batch,
                max_latency_ms=settings.max_latency_ms,
                max_queue=settings.max_queue_images,
                workers=settings.trunk_workers or trunk_workers(backbone),
                on_batch=functools.partial(metrics.batch, name) if metrics else None,
            )
            for name, backbone in backbones.items()
        }
        self.decode_workers = decode_workers()
        self._decode = ThreadPoolExecutor(
            max_workers=self.decode_workers, thread_name_prefix="decode", initializer=use_one_torch_thread
        )
        self._admitted = 0  # images between admission and their answer

    async def stop(self) -> None:
        await asyncio.gather(*(batcher.stop() for batcher in self.batchers.values()))
        self._decode.shutdown(wait=False, cancel_futures=True)

    async def predict(
        self,
        tenant: str,
        images: list[bytes],
        head_refs: list[str],
        options: PredictOptions = DEFAULT_OPTIONS,
        *,
        door: str = "engine",
    ) -> list[ImagePrediction]:
        """One answer per image, listing one prediction per entry of ``head_refs``, in order.

        ``options`` were bounded when the model was built (by a door). A head's answer is
        ``abstained`` when its top calibrated score is below ``min_score``; with ``coverage``
        it carries a conformal prediction set. ``door`` names the caller ("http", "grpc") for metrics only.
        """
        self.check_serving()
        self._check_request(images, head_refs)
        self.rate.take(tenant, len(images))
        with self.holding(len(images)):
            return await self._predict(tenant, images, head_refs, options, door)

    @property
    def in_flight(self) -> int:
        """Images admitted and not yet answered: background work (batch predictions) waits while there are any."""
        return self._admitted

    def check_serving(self) -> None:
        """Raise Unavailable on a replica that only trains (GRAFT_ROLE=train): it takes no predictions."""
        if self.settings.role == "train":
            raise Unavailable(TRAINING_ONLY, role=self.settings.role)

    def check_room(self, count: int = 1) -> None:
        """Raise ResourceExhausted unless ``count`` more images fit under GRAFT_MAX_QUEUE_IMAGES (and
        Unavailable on a replica that takes no predictions at all).

        The HTTP gate asks this before reading a prediction's body, so that a
        full replica refuses a flood of retries at the cost of a header, not a parse.
        """
        self.check_serving()
        limit = self.settings.max_queue_images
        if self._admitted + count > limit:
            raise ResourceExhausted(
                f"this replica is already working on {self._admitted} images (limit {limit}, "
                "GRAFT_MAX_QUEUE_IMAGES); retry shortly",
                retry_after_s=1.0,
            )

    @contextmanager
    def holding(self, count: int) -> Iterator[None]:
        """Count ``count`` images against GRAFT_MAX_QUEUE_IMAGES until they are answered, or refuse them now."""
        self.check_room(count)
        self._admitted += count
        try:
            yield
        finally:
            self._admitted -= count

    async def _predict(
        self, tenant: str, images: list[bytes], head_refs: list[str], options: PredictOptions, door: str
    ) -> list[ImagePrediction]:
        """Every head of the request, and each one's shadow version, scored from one trunk pass per image.

        A shadow joins its head's backbone group, so it is one more row of the same batch (for a linear head,
        of the same gathered matmul); a shadow trained on another backbone than the version served would need a
        second trunk pass, so it is not scored. The shadow's answer is returned only with ``include_shadow``.
        """
        by_ref = await self._load_heads(tenant, head_refs)
        pairs = {head.key: (head, shadow) for head, shadow in by_ref.values()}  # one per version, however named
        heads = [head for head, _ in pairs.values()]
        cuts = thresholds(heads, options.coverage)  # before any image is decoded: a head that cannot answer fails now
        shadows = {
            head.key: shadow
            for head, shadow in pairs.values()
            if shadow is not None and shadow.backbone == head.backbone
        }
        shadow_cuts = {
            key: cut
            for key, cut in _optional_thresholds(list(shadows.values()), options.coverage).items()
            if cut is not None
        }
        by_backbone: dict[str, list[LoadedHead]] = {}
        for head in [*heads, *shadows.values()]:
            group = by_backbone.setdefault(head.backbone, [])
            if all(other.key != head.key for other in group):
                group.append(head)
        keep_pooled = self.observer is not None and self.observer.keeps_embeddings

        loop = asyncio.get_running_loop()

        async def one_image(index: int, data: bytes) -> tuple[dict[HeadKey, HeadPrediction], dict[str, torch.Tensor]]:
            results: dict[HeadKey, HeadPrediction] = {}
            pooled: dict[str, torch.Tensor] = {}
            for backbone_name, group in by_backbone.items():
                backbone = self.backbones[backbone_name]
                prepare = partial(
                    prepare_image,
                    backbone,
                    data,
                    name=f"image {index}",
                    max_bytes=self.settings.max_image_bytes,
                    max_pixels=self.settings.max_image_pixels,
                )
                tensor = await loop.run_in_executor(self._decode, prepare)
                row = await self.batchers[backbone_name].submit(tensor, group, options.include_embedding, keep_pooled)
                for head, logits in zip(group, row.logits, strict=True):
                    cut = cuts.get(head.key, shadow_cuts.get(head.key))
                    results[head.key] = head_prediction(head, logits, cut, options)
                if row.embedding is not None:
                    pooled[backbone_name] = row.embedding
            return results, pooled

        # Every image ends (answered or failed) before the request does: its slots are free once given back.
        outcomes = await asyncio.gather(*(one_image(i, data) for i, data in enumerate(images)), return_exceptions=True)
        answered: list[tuple[dict[HeadKey, HeadPrediction], dict[str, torch.Tensor]]] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            answered.append(outcome)
        served = [
            Served(
                head=head,
                shadow=shadows.get(head.key),
                answers=[results[head.key] for results, _ in answered],
                shadow_answers=[results[shadow.key] for results, _ in answered]
                if (shadow := shadows.get(head.key)) is not None
                else None,
            )
            for head in heads
        ]
        ids: list[str | None] = [None] * len(images)
        if self.observer is not None:
            embeddings = {
                name: torch.stack([pooled[name] for _, pooled in answered])
                for name in by_backbone
                if all(name in pooled for _, pooled in answered)
            }
            ids = list(self.observer.observe(tenant, served, embeddings))
        predictions = [
            ImagePrediction(
                heads=[_answer(by_ref[ref][0], results, shadows, options) for ref in head_refs],
                embedding=_embedding(pooled) if options.include_embedding else None,
                prediction_id=prediction_id,
            )
            for (results, pooled), prediction_id in zip(answered, ids, strict=True)
        ]
        if self.metrics is not None:
            for head in heads:
                self.metrics.predictions(head.kind.value, door, len(images))
        return predictions

    async def _load_heads(self, tenant: str, head_refs: list[str]) -> dict[str, tuple[LoadedHead, LoadedHead | None]]:
        """Each distinct reference's head and its shadow; the first failing reference in request order raises."""
        refs = list(dict.fromkeys(head_refs))
        outcomes = await asyncio.gather(*(self.heads.get_served(tenant, ref) for ref in refs), return_exceptions=True)
        loaded: dict[str, tuple[LoadedHead, LoadedHead | None]] = {}
        for ref, outcome in zip(refs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            loaded[ref] = outcome
        return loaded

    def _check_request(self, images: list[bytes], head_refs: list[str]) -> None:
        if not images:
            raise InvalidArgument("send at least one image")
        if len(images) > self.settings.max_images_per_request:
            raise InvalidArgument(
                f"{len(images)} images in one request; the limit is {self.settings.max_images_per_request}"
            )
        if not head_refs:
            raise InvalidArgument("name at least one head (e.g. 'my-head', 'my-head@2' or 'my-head:prod')")
        if len(head_refs) > self.settings.max_heads_per_request:
            raise InvalidArgument(
                f"{len(head_refs)} heads in one request; the limit is {self.settings.max_heads_per_request}"
            )


def _answer(
    head: LoadedHead,
    results: dict[HeadKey, HeadPrediction],
    shadows: dict[HeadKey, LoadedHead],
    options: PredictOptions,
) -> HeadPrediction:
    """The head's answer, with its shadow's when asked (null where it has none)."""
    answer = results[head.key]
    if not options.include_shadow:
        return answer
    shadow = shadows.get(head.key)
    return answer.model_copy(update={"shadow": None if shadow is None else results[shadow.key]})


def _embedding(pooled: dict[str, torch.Tensor]) -> list[float] | None:
    """The image's pooled features (the first backbone's, as before shadows: one backbone per request is usual)."""
    return next(iter(pooled.values())).tolist() if pooled else None


def _optional_thresholds(heads: list[LoadedHead], coverage: float | None) -> dict[HeadKey, float | None]:
    """Shadows' conformal thresholds where they can promise ``coverage``; a shadow that cannot has no set (it
    must never fail the request it only watches)."""
    out: dict[HeadKey, float | None] = {}
    for head in heads:
        try:
            out |= thresholds([head], coverage)
        except FailedPrecondition:
            out[head.key] = None
    return out


def trunk_workers(backbone: Backbone) -> int:
    """Serving batches run at once by default: one per torch thread on a CPU, one on a GPU (Placement)."""
    return torch.get_num_threads() if backbone.placement.parallel_batches else 1


def decode_workers() -> int:
    """Half the cores this process may use (at least one): the trunk needs the rest."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // 2)
