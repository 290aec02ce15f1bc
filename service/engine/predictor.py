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
    head: str
    version: int
    top: list[LabelScore]
    abstained: bool = Field(
        False, description="the top score is below the request's min_score: do not act on `top` unchecked"
    )
    prediction_set: list[str] | None = Field(
        None, description="with `coverage`: the labels that contain the true one with that probability, likeliest first"
    )


class ImagePrediction(BaseModel):
    heads: list[HeadPrediction]
    embedding: list[float] | None = None


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
    ) -> None:
        self.backbones = backbones
        self.heads = heads
        self.settings = settings
        self.metrics = metrics
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
        by_ref = await self._load_heads(tenant, head_refs)
        heads = list({head.key: head for head in by_ref.values()}.values())  # one per version, however named
        cuts = thresholds(heads, options.coverage)  # before any image is decoded: a head that cannot answer fails now
        by_backbone: dict[str, list[LoadedHead]] = {}
        for head in heads:
            by_backbone.setdefault(head.backbone, []).append(head)

        loop = asyncio.get_running_loop()

        async def one_image(index: int, data: bytes) -> ImagePrediction:
            results: dict[HeadKey, HeadPrediction] = {}
            pooled: list[float] | None = None
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
                row = await self.batchers[backbone_name].submit(tensor, group, options.include_embedding)
                for head, logits in zip(group, row.logits, strict=True):
                    results[head.key] = head_prediction(head, logits, cuts.get(head.key), options)
                if row.embedding is not None and pooled is None:
                    pooled = row.embedding.tolist()
            return ImagePrediction(heads=[results[by_ref[ref].key] for ref in head_refs], embedding=pooled)

        # Every image ends (answered or failed) before the request does: its slots are free once given back.
        outcomes = await asyncio.gather(*(one_image(i, data) for i, data in enumerate(images)), return_exceptions=True)
        predictions: list[ImagePrediction] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            predictions.append(outcome)
        if self.metrics is not None:
            for head in heads:
                self.metrics.predictions(head.kind.value, door, len(images))
        return predictions

    async def _load_heads(self, tenant: str, head_refs: list[str]) -> dict[str, LoadedHead]:
        """Each distinct reference's head; the first failing reference in request order raises."""
        refs = list(dict.fromkeys(head_refs))
        outcomes = await asyncio.gather(*(self.heads.get(tenant, ref) for ref in refs), return_exceptions=True)
        loaded: dict[str, LoadedHead] = {}
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


def trunk_workers(backbone: Backbone) -> int:
    """Serving batches run at once by default: one per torch thread on a CPU, one on a GPU (Placement)."""
    return torch.get_num_threads() if backbone.placement.parallel_batches else 1


def decode_workers() -> int:
    """Half the cores this process may use (at least one): the trunk needs the rest."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // 2)
