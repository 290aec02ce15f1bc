"""One chunk of a batch prediction: its examples' images through the trunk, below online predictions.

Online predictions come first (docs/architecture.md, decision 10). A chunk is cut into
serving-sized parts; before each part a worker waits, bounded, for a moment with no
serving batch (``TrunkPriority.yield_to_serving``, as training's extraction does), so a
part never starts while predictions wait for the trunk. The workers are also the
lowest-priority threads of the process (niceness 19), so when a prediction arrives
while a part runs, the operating system gives the cores to the prediction: a batch job
takes what serving leaves. There are as many workers as serving batches run at once
(one per core on a CPU, each single-threaded; one on a GPU), so an idle replica runs a
batch job as fast as it serves.

Each part runs the trunk once and every head of the job on its rows (``run_batch``, the
serving path), and each head answers as an online prediction would (``head_prediction``).
"""

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from service.config import Settings
from service.engine.backbones import Backbone
from service.engine.device import use_one_torch_thread
from service.engine.execution import run_batch
from service.engine.head_cache import LoadedHead
from service.engine.predictor import head_prediction, trunk_workers
from service.engine.preprocess import prepare_image
from service.errors import Cancelled
from service.prediction_options import PredictOptions
from service.store.blobs import BlobStore

log = logging.getLogger(__name__)

BACKGROUND_NICENESS = 19  # the lowest priority Linux gives a thread


@dataclass(frozen=True)
class BatchExample:
    """One dataset example a batch prediction answers, named as its upload named it."""

    index: int
    file_name: str | None
    client_id: str | None
    image_sha256: str


def lower_thread_priority() -> None:
    """A worker's initializer: single-threaded torch, and the lowest CPU priority for this thread only."""
    use_one_torch_thread()
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the trunk priority still orders the work
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


class ChunkPredictor:
    """Answers a chunk of examples for a job's heads, in background threads of its own."""

    def __init__(self, backbones: dict[str, Backbone], blobs: BlobStore, settings: Settings) -> None:
        self.backbones = backbones
        self.blobs = blobs
        self.settings = settings
        first = next(iter(backbones.values()))
        self.part_size = settings.max_batch_size or first.placement.serving_batch
        self.workers = settings.trunk_workers or trunk_workers(first)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="batch", initializer=lower_thread_priority)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def predict(
        self,
        heads: list[LoadedHead],
        examples: list[BatchExample],
        options: PredictOptions,
        cancelled: Callable[[], bool],
    ) -> list[dict[str, Any]]:
        """One result row per example, in order; ``heads`` in the job's order (a version may repeat)."""
        distinct = {head.key: head for head in heads}
        by_backbone: dict[str, list[LoadedHead]] = {}
        for head in distinct.values():
            by_backbone.setdefault(head.backbone, []).append(head)
        parts = [examples[i : i + self.part_size] for i in range(0, len(examples), self.part_size)]

        def answer(part: list[BatchExample]) -> list[dict[str, Any]]:
            if cancelled():
                raise Cancelled("batch prediction cancelled")
            answers: list[dict[Any, Any]] = [{} for _ in part]
            for name, group in by_backbone.items():
                backbone = self.backbones[name]
                images = torch.stack([self._prepare(backbone, example) for example in part])
                backbone.priority.yield_to_serving()
                output = run_batch(backbone, images, [group] * len(part), False)
                for row, error in enumerate(output.errors):
                    if error is not None:
                        raise error
                    for head, logits in zip(group, output.logits[row], strict=True):
                        assert logits is not None  # a row without an error has every head's
                        answers[row][head.key] = head_prediction(head, logits.float().cpu(), None, options)
            return [
                _row(example, [found[head.key] for head in heads]) for example, found in zip(part, answers, strict=True)
            ]

        rows: list[dict[str, Any]] = []
        for part_rows in self._pool.map(answer, parts):
            rows += part_rows
        return rows

    def _prepare(self, backbone: Backbone, example: BatchExample) -> torch.Tensor:
        return prepare_image(
            backbone,
            self.blobs.get(example.image_sha256),
            name=example.file_name or f"example {example.index}",
            max_bytes=self.settings.max_image_bytes,
            max_pixels=self.settings.max_image_pixels,
        )


def _row(example: BatchExample, answers: list[Any]) -> dict[str, Any]:
    """One example's results as stored and downloaded: its names, then each head's answer."""
    return {
        "index": example.index,
        "file_name": example.file_name,
        "client_id": example.client_id,
        "image_sha256": example.image_sha256,
        "heads": [
            {
                "head": answer.head,
                "version": answer.version,
                "label": answer.top[0].label,
                "score": answer.top[0].score,
                "abstained": answer.abstained,
                "top": [{"label": top.label, "score": top.score} for top in answer.top],
            }
            for answer in answers
        ],
    }
