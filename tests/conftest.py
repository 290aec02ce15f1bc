"""Shared fixtures: one real pretrained backbone per test session, fresh storage per test."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from service.config import Settings
from service.core import Core
from service.engine.backbones import Backbone, load_backbone
from service.engine.device import choose_placement


@pytest.fixture(scope="session")
def mobilenet() -> Backbone:
    """The real MobileNetV2 with verified ImageNet weights (``make weights`` provisions them)."""
    torch.manual_seed(0)
    return load_backbone("mobilenet_v2", choose_placement("cpu"))


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, the loop BentoML and grpc.aio use."""
    return "asyncio"


@pytest.fixture(scope="session")
def make_core(mobilenet) -> Callable[[Path], Core]:
    """A Core on fresh storage in ``data_dir`` that shares the session's backbone (loading one takes seconds)."""

    def make(data_dir: Path) -> Core:
        core = Core.open(Settings(data_dir=data_dir), backbones=[])
        core.backbones[mobilenet.name] = mobilenet
        return core

    return make
