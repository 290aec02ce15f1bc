"""The whole recipe on real images: dataset -> cached features -> tuned head -> registry."""

import json

import pytest
import torch

from adapters.kinds import HeadConfig, HeadKind, load_head
from adapters.search_space import SearchSpace
from harness.sample_data import fashion_mnist_pngs
from service.core import Core
from service.errors import Cancelled, FailedPrecondition, NotFound
from service.training import FEATURE_BYTES, FEATURE_COPIES, HyperParamOverrides, TrainRequest

TENANT = "acme"
ONE_TRIAL = SearchSpace(lr=[1.0], weight_decay=[1e-3])


@pytest.fixture(scope="module")
def core(tmp_path_factory, make_core) -> Core:
    return make_core(tmp_path_factory.mktemp("graft"))


@pytest.fixture(scope="module")
def fashion(core):
    files = fashion_mnist_pngs("train", per_class=12, seed=3)
    return core.datasets.create(TENANT, "fashion", [(f"{i}.png", data, label) for i, (data, label) in enumerate(files)])


@pytest.mark.parametrize(
    ("kind", "search", "min_accuracy"),
    [
        (HeadKind.LINEAR, None, 0.5),
        (HeadKind.MLP, SearchSpace(lr=[3e-3], weight_decay=[1e-4], hidden=[256]), 0.5),
        (HeadKind.FINETUNE, SearchSpace(lr=[1e-3], weight_decay=[1e-4]), 0.4),
    ],
)
def test_each_head_kind_learns_fashion_mnist_well_above_chance(core, fashion, kind, search, min_accuracy):
    request = TrainRequest(
        dataset_id=fashion.id,
        head_name=f"fashion-{kind.value}",
        kind=kind,
        search=search,
        finetune_blocks=2 if kind is HeadKind.FINETUNE else None,
    )
    version = core.trainer.train(TENANT, request)
    assert version.kind == kind.value
    assert version.metrics["accuracy"] >= min_accuracy  # chance is 0.1
    # It says which runtime and precision computed the features it was trained on: those that serve it here.
    assert version.metrics["trunk"] == core.backbones["mobilenet_v2"].numeric_path(version.split_point)
    assert version.metrics["trunk"].endswith("-fp32")
    assert len(version.metrics["confusion"]) == 10

    # The stored head reloads and reproduces its hold-out predictions.
    backbone = core.backbones["mobilenet_v2"]
    tail = backbone.fresh_tail(version.split_point) if kind is HeadKind.FINETUNE else None
    head = load_head(HeadConfig.model_validate(version.config), core.heads.load_tensors(version), tail)
    shas = [sha for sha, _ in core.datasets.examples(TENANT, fashion.id)]
    with torch.no_grad():
        logits = head(core.extractor.features(backbone, version.split_point, shas))
    assert logits.shape == (len(shas), 10)


def test_retraining_reads_cached_features_instead_of_running_the_trunk(core, fashion):
    request = TrainRequest(dataset_id=fashion.id, head_name="cached", search=ONE_TRIAL)
    core.trainer.train(TENANT, request)
    written = cache_entries(core)
    core.trainer.train(TENANT, request)
    assert cache_entries(core) == written  # no entry was computed and written again
    assert core.heads.get(TENANT, "cached").latest_version == 2


def test_retraining_the_same_examples_rereads_the_kept_search_and_refits_from_the_last_version(core, fashion):
    request = TrainRequest(dataset_id=fashion.id, head_name="retrained")
    first = core.trainer.train(TENANT, request)
    again = core.trainer.train(TENANT, request)
    assert first.metrics["recipe"]["evidence"] == "searched"
    assert again.metrics["recipe"]["evidence"].startswith("reread")
    for key in ("key", "candidates", "chosen", "rule"):
        assert again.metrics["recipe"][key] == first.metrics["recipe"][key]
    assert again.metrics["accuracy"] == first.metrics["accuracy"]
    # The served refit started at the last version's head, already converged there: the same weights.
    old, new = (core.heads.load_tensors(version) for version in (first, again))
    assert all(torch.equal(old[name], new[name]) for name in old)
    # Other folds, or another head, search again.
    reseeded = core.trainer.train(TENANT, request.model_copy(update={"seed": 1}))
    elsewhere = core.trainer.train(TENANT, request.model_copy(update={"head_name": "retrained-elsewhere"}))
    assert reseeded.metrics["recipe"]["evidence"] == elsewhere.metrics["recipe"]["evidence"] == "searched"


def test_progress_messages_do_not_tell_a_tenant_which_images_another_tenant_uploaded(core):
    """A second tenant with the same images reads the same messages (and its own cache was cold either way)."""
    files = fashion_mnist_pngs("test", per_class=3, seed=11)
    examples = [(f"{i}.png", data, label) for i, (data, label) in enumerate(files)]
    messages = {}
    for tenant in ("first-uploader", "second-uploader"):
        dataset = core.datasets.create(tenant, "same-images", examples)
        seen: list[str] = []

        def extraction_messages(event, seen: list[str] = seen) -> None:
            if event.phase == "extract":
                seen.append(event.message)

        core.trainer.train(
            tenant, TrainRequest(dataset_id=dataset.id, head_name="h", search=ONE_TRIAL), progress=extraction_messages
        )
        messages[tenant] = seen
    assert messages["first-uploader"] == messages["second-uploader"]
    assert messages["first-uploader"][-1] == f"features for {len(examples)}/{len(examples)} images"


def cache_entries(core) -> dict[str, tuple[int, int]]:
    """Each feature-cache file with its inode and mtime: a rewrite changes them."""
    files = core.settings.feature_dir.rglob("*.npy")
    return {str(path): (path.stat().st_ino, path.stat().st_mtime_ns) for path in files}


def test_progress_rises_to_one(core, fashion):
    fractions = []
    request = TrainRequest(
        dataset_id=fashion.id, head_name="progress", search=SearchSpace(lr=[1.0], weight_decay=[1e-3, 1e-2])
    )
    core.trainer.train(TENANT, request, progress=lambda event: fractions.append(event.fraction))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_cancelled_training_stores_no_head(core, fashion):
    request = TrainRequest(dataset_id=fashion.id, head_name="never")
    with pytest.raises(Cancelled):
        core.trainer.train(TENANT, request, cancelled=lambda: True)
    with pytest.raises(NotFound):
        core.heads.get(TENANT, "never")


def test_another_tenants_dataset_is_not_found(core, fashion):
    with pytest.raises(NotFound):
        core.trainer.train("intruder", TrainRequest(dataset_id=fashion.id, head_name="stolen"))


def test_a_backbone_not_loaded_is_not_found(core, fashion):
    with pytest.raises(NotFound, match="not loaded"):
        core.trainer.train(TENANT, TrainRequest(dataset_id=fashion.id, head_name="x", backbone="resnet50"))


def test_finetune_blocks_only_apply_to_finetune():
    with pytest.raises(ValueError, match="finetune_blocks applies to kind 'finetune'"):
        TrainRequest(dataset_id="ds_1", head_name="x", kind=HeadKind.LINEAR, finetune_blocks=2)


def test_a_dataset_too_small_to_hold_out_fails_before_any_extraction(core):
    files = fashion_mnist_pngs("test", per_class=1, seed=9)[:2]
    tiny = core.datasets.create(TENANT, "tiny", [(f"{i}.png", data, label) for i, (data, label) in enumerate(files)])
    phases = []
    with pytest.raises(FailedPrecondition, match="at least 2 examples per class"):
        core.trainer.train(
            TENANT,
            TrainRequest(dataset_id=tiny.id, head_name="tiny"),
            progress=lambda event: phases.append(event.phase),
        )
    assert phases == []


def test_a_guard_that_refuses_stores_no_head(core, fashion):
    class Refused(Exception):
        pass

    def refuse(session):
        raise Refused

    with pytest.raises(Refused):
        core.trainer.train(
            TENANT, TrainRequest(dataset_id=fashion.id, head_name="vetoed", search=ONE_TRIAL), guard=refuse
        )
    with pytest.raises(NotFound):
        core.heads.get(TENANT, "vetoed")


def test_the_cost_of_a_request_is_epochs_times_images_times_trials(core, fashion):
    request = TrainRequest(
        dataset_id=fashion.id,
        head_name="priced",
        kind=HeadKind.MLP,
        hyperparams=HyperParamOverrides(lr=1e-3, weight_decay=0.0, epochs=7, batch_size=16),
        search=SearchSpace(lr=[1e-3, 1e-2], weight_decay=[0.0, 1e-4, 1e-3]),
    )
    cost = core.trainer.cost(TENANT, request)
    assert (cost.epochs, cost.images, cost.trials) == (7, fashion.num_examples, 6)
    assert cost.work == 7 * fashion.num_examples * 6
    with pytest.raises(NotFound):
        core.trainer.cost("intruder", request)


def test_the_memory_of_a_request_is_its_largest_split_points_features_times_images(core, fashion):
    """A fine-tune's block maps, not the pooled vectors, priced from the blocks' shapes."""
    pooled = core.trainer.cost(TENANT, TrainRequest(dataset_id=fashion.id, head_name="p")).memory
    assert (pooled.split, pooled.elements) == ("pooled", 1280)
    assert pooled.bytes == fashion.num_examples * 1280 * FEATURE_BYTES * FEATURE_COPIES
    six = TrainRequest(dataset_id=fashion.id, head_name="f", kind=HeadKind.FINETUNE, finetune_blocks=6)
    finetune = core.trainer.cost(TENANT, six).memory
    assert (finetune.split, finetune.elements) == ("block13", 96 * 14 * 14)  # MobileNetV2 at 224 px
    assert finetune.bytes == fashion.num_examples * 96 * 14 * 14 * FEATURE_BYTES * FEATURE_COPIES
    auto = TrainRequest(dataset_id=fashion.id, head_name="a", kind="auto", auto_finetune=True, finetune_blocks=6)
    assert core.trainer.cost(TENANT, auto).memory == finetune  # the largest of its kinds


def test_a_diverged_trial_leaves_the_stored_metrics_plain_json(core, fashion):
    request = TrainRequest(
        dataset_id=fashion.id,
        head_name="diverged",
        kind=HeadKind.MLP,
        hyperparams=HyperParamOverrides(lr=1e-3, weight_decay=0.0, epochs=5, batch_size=8, hidden=32),
        search=SearchSpace(lr=[10.0, 1e-3], weight_decay=[10.0]),
    )
    version = core.trainer.train(TENANT, request)
    assert [trial["val_loss"] is None for trial in version.metrics["trials"]] == [True, False]
    json.dumps(core.heads.describe(TENANT, "diverged@1").metrics, allow_nan=False)


def test_searching_hidden_widths_applies_to_mlp_heads_only():
    with pytest.raises(ValueError, match="search.hidden applies to kind 'mlp' only"):
        TrainRequest(dataset_id="ds_1", head_name="x", search=SearchSpace(lr=[1e-3], weight_decay=[0.0], hidden=[8]))


def test_a_linear_job_explains_every_choice_of_its_recipe_in_its_metrics(core, fashion):
    version = core.trainer.train(TENANT, TrainRequest(dataset_id=fashion.id, head_name="explained"))
    recipe = version.metrics["recipe"]
    assert recipe["objective"] == version.metrics["objective"] == "accuracy"
    assert recipe["chosen"] == {
        "scaling": version.config["scaling"],
        "class_weighting": recipe["chosen"]["class_weighting"],
        "weight_decay": version.hyperparams["weight_decay"],
    }
    assert {c["scaling"] for c in recipe["candidates"]} == {"none", "standardise", "l2"}
    assert {c["class_weighting"] for c in recipe["candidates"]} == {"none", "balanced"}
    for candidate in recipe["candidates"]:
        assert len(candidate["folds"]) == recipe["folds"]
        assert candidate["mean"] == pytest.approx(sum(candidate["folds"]) / len(candidate["folds"]))
        assert {"std", "accuracy", "balanced_accuracy"} <= set(candidate)
    assert "one standard error" in recipe["rule"] or recipe["rule"].endswith("and is the simplest candidate")
    assert 0.0 <= version.metrics["balanced_accuracy"] <= 1.0  # the hold-out reports both figures
    # The label audit shares the search's folds: it fits no probe of its own.
    assert version.metrics["audit"]["folds"] == recipe["folds"]


def test_a_fixed_recipe_is_trained_as_asked(core, fashion):
    request = TrainRequest(
        dataset_id=fashion.id,
        head_name="fixed",
        scaling="l2",
        class_weighting="balanced",
        objective="balanced_accuracy",
    )
    version = core.trainer.train(TENANT, request)
    assert version.config["scaling"] == "l2"
    assert {(c["scaling"], c["class_weighting"]) for c in version.metrics["recipe"]["candidates"]} == {
        ("l2", "balanced")
    }
    assert version.metrics["recipe"]["objective"] == "balanced_accuracy"
