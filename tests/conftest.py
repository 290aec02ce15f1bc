"""Shared fixtures: one real pretrained backbone per test session, fresh storage per test."""

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torchvision import models

from harness import postgres
from service.config import Settings
from service.core import Core
from service.engine.backbones import Backbone, BackboneSpec, load_backbone, registered
from service.engine.device import choose_placement

# A second backbone that loads in a blink and needs no checkpoint: random weights, so never quoted for accuracy.
UNTRAINED = BackboneSpec(
    name="mobilenet_v3_small-untrained",
    build=lambda: models.mobilenet_v3_small(weights=None),
    blocks=lambda model: list(model.features),
    # MobileNetV3's ImageNet head is two layers (576 -> 1024 -> 1000): the first is the one on the pooled features.
    # Untrained, it is never served as a head; the field only has to fit the figures check.
    classifier=lambda model: model.classifier[0],
    feature_dim=576,
    num_blocks=13,
    num_params=2_542_856,
    gflops=0.057,
    weights=None,
    notes="random weights: plumbing tests only, never for accuracy",
)


@pytest.fixture(scope="session")
def mobilenet() -> Backbone:
    """The real MobileNetV2 with verified ImageNet weights (``make weights`` provisions them)."""
    torch.manual_seed(0)
    return load_backbone("mobilenet_v2", choose_placement("cpu"))


@pytest.fixture
def untrained_backbone() -> Iterator[str]:
    """The name of ``UNTRAINED``, in the backbone registry for one test only: graft does not ship it."""
    with registered(UNTRAINED):
        yield UNTRAINED.name


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


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL for the session (Debian's package, run as its unprivileged user on loopback)."""
    server = postgres.start_postgres()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path) -> str:
    """An empty registry database on each backend the service supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_database(f"test_{uuid.uuid4().hex[:12]}")
