"""Shared set-up for the serving benchmarks: a core in a temp folder, many linear heads, the published trunk.

Heads get random weights: serving cost does not depend on what a head learnt.
"""

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adapters.heads import head_state
from adapters.kinds import HeadConfig, HeadKind, build_head
from service.config import Settings
from service.core import Core
from service.engine.backbones import Backbone

TENANT = "bench"
CLASSES = 10


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
