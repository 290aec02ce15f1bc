"""One chunk of a batch prediction: its examples' images through the trunk, below online predictions.

Online predictions come first (docs/architecture.md, decision 10). A chunk is cut into
parts of two trunk micro-batches (4 images on a CPU; a serving batch on a GPU); before each
part a worker waits, bounded, until no online prediction is in flight (admitted and not yet
answered) and no serving batch runs, as training's extraction yields to serving batches.
So a prediction that arrives while a part runs shares the cores with that one part only,
and one that arrives between parts finds the trunk free; under constant prediction load
the job still moves, one part per ``TrunkPriority.max_wait_s``. There are as many workers
as serving batches run at once (one per core on a CPU, each single-threaded; one on a GPU),
so an idle replica runs a batch job as fast as it serves (README, "Batch predictions":
``benchmarks/batch.py``). The workers keep the process's CPU priority: a lower one
(``nice``) would starve the job behind any other process of the host, and a worker
descheduled while it holds the GIL would stall the predictions waiting for it.

Each part runs the trunk once and every head of the job on its rows (``run_batch``, the
serving path), and each head answers as an online prediction would (``head_prediction``).
"""

import time
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

PART_MICRO_BATCHES = 2  # trunk micro-batches per part on a CPU: fewer calls, a prediction waits behind at most one
IDLE_POLL_S = 0.002  # how often a waiting part looks whether online predictions are still in flight


@dataclass(frozen=True)
class BatchExample:
    """One dataset example a batch prediction answers, named as its upload named it."""

    index: int
    file_name: str | None
    client_id: str | None
    image_sha256: str


class ChunkPredictor:
    """Answers a chunk of examples for a job's heads, in background threads of its own."""

    def __init__(
        self, backbones: dict[str, Backbone], blobs: BlobStore, settings: Settings, serving: Callable[[], int]
    ) -> None:
        """``serving()``: the online prediction images in flight (admitted, not yet answered)."""
        self.backbones = backbones
        self.serving = serving
        self.blobs = blobs
        self.settings = settings
        # Every backbone shares one placement (one device per replica); a runtime may serve none (tests).
        placement = next((backbone.placement for backbone in backbones.values()), None)
        micro = placement.micro_batch if placement is not None else None
        serving_batch = settings.max_batch_size or (placement.serving_batch if placement is not None else 1)
        self.part_size = PART_MICRO_BATCHES * micro if micro else serving_batch
        self.workers = settings.trunk_workers or max((trunk_workers(b) for b in backbones.values()), default=1)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="batch", initializer=use_one_torch_thread)

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
                self._yield_to_predictions(backbone)
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

    def _yield_to_predictions(self, backbone: Backbone) -> None:
        """Wait (bounded: the job still moves under constant load) until no online prediction is in flight,
        then until no serving batch runs."""
        deadline = time.monotonic() + backbone.priority.max_wait_s
        while self.serving() > 0 and time.monotonic() < deadline:
            time.sleep(IDLE_POLL_S)
        backbone.priority.yield_to_serving()

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
