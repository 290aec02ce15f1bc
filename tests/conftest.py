"""Shared fixtures: one real pretrained backbone per test session, fresh storage per test."""

import pytest
import torch

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
