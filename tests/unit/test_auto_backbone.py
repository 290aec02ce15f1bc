"""backbone 'auto': k-fold cross-validated linear probes choose the backbone, on the user's own data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

from adapters.crossval import CrossValScore, choose, cross_validate_linear, stratified_folds
from adapters.errors import InvalidInput
from harness.sample_data import fashion_mnist_pngs, textile_files
from service.config import Settings
from service.core import Core
from service.errors import FailedPrecondition
from service.training import TrainRequest

TENANT = "acme"


def score(*folds: float) -> CrossValScore:
    return CrossValScore(mean=float(np.mean(folds)), std=float(np.std(folds)), folds=list(folds), weight_decay=0.1)


def test_folds_are_stratified_disjoint_and_cover_every_example():
    labels = [0] * 10 + [1] * 5 + [2] * 7
    folds = stratified_folds(labels, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
    assert all(sum(labels[i] == 1 for i in fold) == 1 for fold in folds)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


def test_a_class_smaller_than_the_folds_is_a_clear_error():
    with pytest.raises(InvalidInput, match="at least 5 examples of every class; the smallest class has 3"):
        stratified_folds([0] * 10 + [1] * 3, 5)


def test_a_clear_lead_beats_a_cheaper_backbone():
    choice = choose(
        {"cheap": score(0.70, 0.72, 0.71, 0.69, 0.70), "big": score(0.78, 0.80, 0.77, 0.79, 0.78)},
        {"cheap": 0.3, "big": 0.87},
    )
    assert choice.chosen == "big"
    assert "big (0.784" in choice.reason and "more than the standard error" in choice.reason


def test_a_lead_within_the_spread_goes_to_the_cheaper_backbone():
    choice = choose(
        {"cheap": score(0.80, 0.76, 0.83, 0.78, 0.81), "big": score(0.79, 0.80, 0.82, 0.80, 0.80)},
        {"cheap": 0.3, "big": 0.87},
    )
    assert choice.chosen == "cheap"
    assert choice.reason.startswith("tie:") and "the cheaper cheap wins" in choice.reason


def test_cross_validation_scores_separable_features_perfectly():
    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 8) * 0.1 + torch.nn.functional.one_hot(y, 8).float() * 5
    result = cross_validate_linear(x, y, 3)
    assert result.mean == 1.0 and result.std == 0.0 and len(result.folds) == 5


@pytest.fixture(scope="module")
def two_backbone_core(tmp_path_factory, mobilenet) -> Core:
    """Both pretrained backbones on fresh storage (MobileNetV2 shared with the session)."""
    core = Core.open(Settings(data_dir=tmp_path_factory.mktemp("auto")), backbones=["efficientnet_lite2"])
    core.backbones[mobilenet.name] = mobilenet
    return core


def train_auto(core: Core, name: str, items: list[tuple[str, bytes, str]]):
    dataset = core.datasets.create(TENANT, name, items)
    return core.trainer.train(TENANT, TrainRequest(dataset_id=dataset.id, head_name=name, backbone="auto"))


@pytest.mark.slow
def test_auto_picks_efficientnet_lite2_on_the_textile_images(two_backbone_core):
    """The benchmark's 300 training images (stratified, seed 0): EfficientNet-Lite2 leads by about 7 points in CV."""
    files = textile_files(10_000)
    train, _ = train_test_split(files, train_size=300, test_size=300, stratify=[f[2] for f in files], random_state=0)
    version = train_auto(two_backbone_core, "textiles", train)
    assert version.backbone == "efficientnet_lite2", version.metrics["backbone_choice"]["reason"]
    assert version.metrics["cv_accuracy_efficientnet_lite2"] > version.metrics["cv_accuracy_mobilenet_v2"]
    assert set(version.metrics["backbone_choice"]["scores"]) == {"mobilenet_v2", "efficientnet_lite2"}


@pytest.mark.slow
def test_auto_picks_mobilenet_v2_on_fashion_mnist(two_backbone_core):
    """40 images per class: the two backbones tie within the per-fold spread, so the cheaper MobileNetV2 wins."""
    items = [(f"{i}.png", data, label) for i, (data, label) in enumerate(fashion_mnist_pngs("train", 40, seed=0))]
    version = train_auto(two_backbone_core, "fashion", items)
    assert version.backbone == "mobilenet_v2", version.metrics["backbone_choice"]["reason"]
    assert version.split_point == two_backbone_core.backbones["mobilenet_v2"].num_blocks


def test_auto_needs_a_pretrained_backbone(tmp_path):
    core = Core.open(Settings(data_dir=Path(tmp_path)), backbones=["mobilenet_v3_small-untrained"])
    items = [(f"{i}.png", data, label) for i, (data, label) in enumerate(fashion_mnist_pngs("train", 5, seed=0))]
    dataset = core.datasets.create(TENANT, "tiny", items)
    with pytest.raises(FailedPrecondition, match="chooses among pretrained backbones.*GRAFT_BACKBONES"):
        core.trainer.cost(TENANT, TrainRequest(dataset_id=dataset.id, head_name="tiny", backbone="auto"))


def test_a_latency_budget_needs_backbone_auto():
    with pytest.raises(ValueError, match="latency_budget_ms applies to backbone 'auto' only"):
        TrainRequest(dataset_id="ds", head_name="h", latency_budget_ms=10)


def test_a_class_smaller_than_the_folds_gets_fewer_folds():
    torch.manual_seed(0)
    y = torch.tensor([0] * 10 + [1] * 3)
    x = torch.randn(13, 4) + torch.nn.functional.one_hot(y, 4).float() * 5
    assert len(cross_validate_linear(x, y, 2).folds) == 3
