"""Instant prototype heads and ``kind: "auto"``, on real MobileNetV2 features of real Fashion-MNIST images."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from adapters.errors import InvalidInput
from adapters.heads import PrototypeHead
from adapters.kinds import HeadConfig, HeadKind, load_head
from adapters.prototype import DEFAULT_TEMPERATURE, MAX_TEMPERATURE, MIN_TEMPERATURE, fit_prototype
from harness.sample_data import fashion_mnist_pngs
from service.core import Core
from service.engine.execution import run_batch
from service.engine.head_cache import HeadCache, materialise
from service.engine.predictor import Predictor
from service.engine.preprocess import prepare_image
from service.errors import FailedPrecondition
from service.grpc import convert
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.prediction_options import PredictOptions
from service.resources import TrainingKind, TrainingSpec
from service.training import TrainRequest

TENANT = "acme"


@pytest.fixture(scope="module")
def core(tmp_path_factory, make_core) -> Core:
    return make_core(tmp_path_factory.mktemp("graft"))


def dataset(core: Core, name: str, split: str, per_class: int, seed: int):
    files = fashion_mnist_pngs(split, per_class=per_class, seed=seed)
    return core.datasets.create(TENANT, name, [(f"{i}.png", data, label) for i, (data, label) in enumerate(files)])


@pytest.fixture(scope="module")
def one_shot(core):
    return dataset(core, "one-shot", "train", per_class=1, seed=5)


@pytest.fixture(scope="module")
def few_shot(core):
    return dataset(core, "few-shot", "train", per_class=8, seed=6)


@pytest.fixture(scope="module")
def test_images() -> list[tuple[bytes, str]]:
    return fashion_mnist_pngs("test", per_class=3, seed=7)


def features_and_labels(core: Core, ds) -> tuple[torch.Tensor, torch.Tensor]:
    backbone = core.backbones["mobilenet_v2"]
    examples = core.datasets.examples(TENANT, ds.id)
    index = {name: i for i, name in enumerate(ds.classes)}
    x = core.extractor.features(backbone, backbone.num_blocks, [sha for sha, _ in examples])
    return x, torch.tensor([index[label] for _, label in examples])


async def predict(core: Core, images: list[bytes], heads: list[str], top_k: int = 1):
    predictor = Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), core.settings)
    try:
        return await predictor.predict(TENANT, images, heads, PredictOptions(top_k=top_k))
    finally:
        await predictor.stop()


@pytest.mark.anyio
async def test_a_prototype_head_learns_from_one_image_per_class_and_says_it_has_no_hold_out(
    core, one_shot, test_images
):
    version = core.trainer.train(TENANT, TrainRequest(dataset_id=one_shot.id, head_name="one", kind="prototype"))

    assert version.kind == "prototype"
    assert version.metrics["num_examples"] == 0 and "accuracy" not in version.metrics
    assert "no class has two examples" in version.metrics["holdout"]
    answers = await predict(core, [data for data, _ in test_images], ["one"])
    correct = sum(
        answer.heads[0].top[0].label == label for answer, (_, label) in zip(answers, test_images, strict=True)
    )
    assert correct / len(test_images) >= 0.3  # chance is 0.1, from ten training images


@pytest.mark.anyio
async def test_prototype_scores_through_the_predict_path_are_the_calibrated_softmax_of_the_stored_module(
    core, few_shot, test_images
):
    version = core.trainer.train(TENANT, TrainRequest(dataset_id=few_shot.id, head_name="proto", kind="prototype"))
    images = [data for data, _ in test_images[:4]]

    answers = await predict(core, images, ["proto"], top_k=10)

    backbone = core.backbones["mobilenet_v2"]
    config = HeadConfig.model_validate(version.config)
    module = load_head(config, core.heads.load_tensors(version))
    temperature = config.calibration.temperature if config.calibration else 1.0
    pixels = torch.stack(
        [prepare_image(backbone, data, name="x", max_bytes=1 << 24, max_pixels=1 << 24) for data in images]
    )
    with torch.no_grad():
        expected = torch.softmax(module(backbone.features(pixels)) / temperature, dim=1)
    for answer, probabilities in zip(answers, expected, strict=True):
        scores = {score.label: score.score for score in answer.heads[0].top}
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
        by_class = torch.tensor([scores[label] for label in version.classes])
        torch.testing.assert_close(by_class, probabilities, rtol=1e-4, atol=1e-5)


def test_gathered_prototype_heads_equal_the_calibrated_module_beside_linear_heads_in_one_batch(core, few_shot):
    backbone = core.backbones["mobilenet_v2"]
    proto = core.trainer.train(TENANT, TrainRequest(dataset_id=few_shot.id, head_name="p-mix", kind="prototype"))
    linear = core.trainer.train(TENANT, TrainRequest(dataset_id=few_shot.id, head_name="l-mix", kind="linear"))
    heads = {info.kind: materialise(info, core.heads.load_tensors(info), backbone) for info in (proto, linear)}
    assert heads["prototype"].gathered and heads["prototype"].module is None  # served like a linear head
    images = torch.randn(3, 3, 224, 224)
    row_heads = [[heads["prototype"], heads["linear"]], [heads["linear"]], [heads["prototype"]]]

    batch = run_batch(backbone, images, row_heads, want_embeddings=False)

    configs = {info.kind: HeadConfig.model_validate(info.config) for info in (proto, linear)}
    modules = {
        kind: load_head(config, core.heads.load_tensors(info))
        for (kind, config), info in zip(configs.items(), (proto, linear), strict=True)
    }
    with torch.no_grad():
        pooled = backbone.features(images)
        # served logits carry the version's calibration temperature
        expected = {kind: module(pooled) / configs[kind].calibration.temperature for kind, module in modules.items()}
    for row, wanted in enumerate(row_heads):
        for slot, head in enumerate(wanted):
            torch.testing.assert_close(batch.logits[row][slot], expected[head.kind.value][row], rtol=1e-4, atol=1e-4)


def test_the_temperature_is_fit_on_leave_one_out_scores_and_defaults_without_them(core, few_shot, one_shot):
    x, y = features_and_labels(core, few_shot)
    head = PrototypeHead(x.shape[1], 10)
    fit_prototype(head, x, y)
    assert MIN_TEMPERATURE < head.temperature.item() < MAX_TEMPERATURE
    assert torch.allclose(head.prototypes.norm(dim=1), torch.ones(10))
    # the temperature never moves the argmax: the class means still sort their own examples
    assert (head(x).argmax(1) == y).float().mean() > 0.8

    x1, y1 = features_and_labels(core, one_shot)
    lone = PrototypeHead(x1.shape[1], 10)
    fit_prototype(lone, x1, y1)
    assert lone.temperature.item() == DEFAULT_TEMPERATURE
    assert (lone(x1).argmax(1) == y1).all()


def test_auto_keeps_the_cheapest_kind_within_one_standard_error_of_the_best_k_fold_score(core, few_shot):
    events = []
    version = core.trainer.train(
        TENANT, TrainRequest(dataset_id=few_shot.id, head_name="auto", kind="auto"), progress=events.append
    )

    choice = version.metrics["kind_choice"]
    candidates = {c["kind"]: c for c in choice["candidates"]}
    assert list(candidates) == ["prototype", "linear", "mlp"]
    assert all(c["status"] == "trained" and c["seconds"] > 0 for c in candidates.values())
    folds = {kind: np.asarray(c["scores"]["folds"]) for kind, c in candidates.items()}
    assert all(c["scores"]["mean"] == pytest.approx(folds[kind].mean()) for kind, c in candidates.items())
    best = max(folds, key=lambda kind: folds[kind].mean())

    def within_one_standard_error(kind: str) -> bool:
        gaps = folds[best] - folds[kind]
        return gaps.mean() <= gaps.std(ddof=1) / np.sqrt(len(gaps)) + 1e-12

    assert version.kind == choice["chosen"] == next(kind for kind in candidates if within_one_standard_error(kind))
    assert "standard error" in choice["reason"]
    assert {f"auto_score_{kind}" for kind in candidates} <= set(version.metrics)
    assert [e.phase for e in events if e.phase in ("auto", "choose")] == ["auto", "auto", "auto", "choose"]
    assert all(0.0 <= e.fraction <= 1.0 for e in events)


def test_auto_stops_at_its_time_budget_but_always_trains_the_first_kind(core, few_shot):
    request = TrainRequest(
        dataset_id=few_shot.id, head_name="hurried", kind="auto", time_budget_s=1e-3, auto_finetune=True
    )
    version = core.trainer.train(TENANT, request)

    statuses = {c["kind"]: c["status"] for c in version.metrics["kind_choice"]["candidates"]}
    assert statuses["prototype"] == "trained" and version.kind == "prototype"
    assert statuses["linear"] == statuses["mlp"] == "over_budget"
    assert statuses["finetune"] == "skipped"  # 8 images per class, 6 of them training: too few to finetune


def test_auto_on_one_image_per_class_trains_a_prototype_and_says_why(core, one_shot):
    version = core.trainer.train(TENANT, TrainRequest(dataset_id=one_shot.id, head_name="auto-one", kind="auto"))
    assert version.kind == "prototype"
    assert "no folds to compare kinds on" in version.metrics["kind_choice"]["reason"]


def test_a_kind_that_needs_a_hold_out_refuses_one_image_per_class_and_names_the_kind_that_does_not(core, one_shot):
    with pytest.raises(FailedPrecondition, match="prototype"):
        core.trainer.train(TENANT, TrainRequest(dataset_id=one_shot.id, head_name="lin-one", kind="linear"))


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"kind": "prototype", "search": {"lr": [1.0], "weight_decay": [0.0]}}, "no hyper-parameters"),
        ({"kind": "auto", "hyperparams": {"epochs": 3}}, "no hyper-parameters"),
        ({"kind": "linear", "time_budget_s": 10}, "time_budget_s applies to kind 'auto' only"),
        ({"kind": "mlp", "auto_finetune": True}, "auto_finetune applies to kind 'auto' only"),
        ({"kind": "auto", "time_budget_s": 0}, "greater than 0"),
        ({"kind": "auto", "time_budget_s": 1e6}, "less than or equal"),
        ({"kind": "nearest"}, "'auto'"),
        ({"kind": "auto", "finetune_blocks": 2}, "finetune_blocks applies"),
    ],
)
def test_bad_kind_requests_fail_with_a_clear_error(fields, error):
    with pytest.raises(ValidationError, match=error):
        TrainRequest(dataset_id="ds", head_name="h", **fields)


def test_a_prototype_head_needs_every_class_and_no_dropout(core, few_shot):
    x, y = features_and_labels(core, few_shot)
    keep = y != 3
    with pytest.raises(InvalidInput, match=r"class ids \[3\]"):
        fit_prototype(PrototypeHead(x.shape[1], 10), x[keep], y[keep])
    with pytest.raises(ValidationError, match="no dropout"):
        HeadConfig(kind=HeadKind.PROTOTYPE, in_features=1280, num_classes=10, dropout=0.2)


def test_both_doors_carry_prototype_and_auto_and_refuse_an_unknown_kind():
    for kind, number in (("prototype", pb.HEAD_KIND_PROTOTYPE), ("auto", pb.HEAD_KIND_AUTO)):
        spec = convert.training_spec(pb.TrainingSpec(dataset="datasets/ds", head="h", kind=number))
        assert spec.kind is TrainingKind(kind)
        assert spec.request().kind == kind
        back = convert.message(TrainingSpec.of(spec.request()), pb.TrainingSpec)
        assert back.kind == number
    auto = TrainingSpec.model_validate({"dataset": "ds", "head": "h", "kind": "auto", "time_budget_s": 5})
    assert convert.message(TrainingSpec.of(auto.request()), pb.TrainingSpec).time_budget_s == 5
    with pytest.raises(Exception, match="HEAD_KIND_PROTOTYPE, HEAD_KIND_AUTO"):
        convert.training_spec(pb.TrainingSpec(dataset="datasets/ds", head="h", kind=42))
