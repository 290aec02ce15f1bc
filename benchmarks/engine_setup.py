"""Shared set-up for the serving benchmarks: a core in a temp folder, many linear heads, the published trunk.

Heads get random weights: serving cost does not depend on what a head learnt.
"""

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adapters.heads import head_state
from adapters.kinds import HeadConfig, HeadKind, build_head
from service.config import Settings
from service.core import Core
from service.engine.backbones import Backbone
from service.engine.predictor import Predictor

TENANT = "bench"
CLASSES = 10
REQUEST_IMAGES = 10  # images per request of a saturating client
CONCURRENCY = 8  # its requests in flight


def published_trunk(backbone: Backbone, micro_batch: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a user runs without graft: the published blocks (real batch norms, NCHW) in eager torch on the
    backbone's device, then global pooling; in ``micro_batch``-image pieces when given."""
    blocks = backbone.cpu_copy(0).to(backbone.placement.device)

    @torch.inference_mode()
    def features(images: torch.Tensor) -> torch.Tensor:
        parts = images.to(backbone.placement.device).split(micro_batch or len(images))
        return torch.cat([torch.flatten(nn.functional.adaptive_avg_pool2d(blocks(part), 1), 1) for part in parts])

    return features


def open_core(**settings) -> Core:
    return Core.open(Settings(data_dir=Path(tempfile.mkdtemp(prefix="graft-bench-")), **settings))


def create_linear_heads(core: Core, count: int, prefix: str = "h", tenant: str = TENANT) -> list[str]:
    """``count`` linear heads of ``CLASSES`` classes on the pooled features; returns their names."""
    backbone = core.backbones[core.settings.default_backbone]
    config = HeadConfig(kind=HeadKind.LINEAR, in_features=backbone.spec.feature_dim, num_classes=CLASSES)
    names = []
    for i in range(count):
        torch.manual_seed(i)
        head = build_head(config)
        name = f"{prefix}{i}"
        core.heads.create_version(
            tenant,
            name,
            tensors=head_state(head),
            backbone=backbone.name,
            split_point=backbone.num_blocks,
            kind="linear",
            classes=[f"class-{c}" for c in range(CLASSES)],
            config=config.model_dump(mode="json"),
            hyperparams={},
            metrics={},
            dataset_id="ds_bench",
        )
        names.append(name)
    return names


def head_param_bytes() -> int:
    """Bytes of one linear head's parameters as served (weight + bias, float32)."""
    return (1280 * CLASSES + CLASSES) * 4


async def images_per_second(predictor: Predictor, head: str, images: list[bytes]) -> float:
    """Images/s of ``images`` sent to ``head`` as online predictions in requests of REQUEST_IMAGES, CONCURRENCY at
    a time: a client that keeps the service saturated."""
    requests = [images[i : i + REQUEST_IMAGES] for i in range(0, len(images), REQUEST_IMAGES)]
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(batch: list[bytes]) -> None:
        async with slots:
            await predictor.predict(TENANT, batch, [head])

    started = time.perf_counter()
    await asyncio.gather(*(one(batch) for batch in requests))
    return len(images) / (time.perf_counter() - started)
