"""Shared set-up for the serving benchmarks: a core in a temp folder and many linear heads.

Heads get random weights: serving cost does not depend on what a head learnt.
"""

import tempfile
from pathlib import Path

import torch

from adapters.heads import head_state
from adapters.kinds import HeadConfig, HeadKind, build_head
from service.config import Settings
from service.core import Core

TENANT = "bench"
CLASSES = 10


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
