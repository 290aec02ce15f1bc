"""Heads, training, tuning, metrics and splits, on scikit-learn's digits as stand-in features."""

import ast
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from adapters.errors import InvalidInput, TrainingCancelled
from adapters.heads import LinearHead, head_state, normalised
from adapters.kinds import HeadConfig, HeadKind, build_head, get_kind, load_head
from adapters.metrics import evaluate, finite
from adapters.recipe import Scaling, class_weights
from adapters.search_space import MAX_GRID_VALUES, SearchSpace
from adapters.splits import stratified_split
from adapters.trainer import (
    HyperParams,
    ProgressEvent,
    accuracy,
    fit_finetune,
    fit_linear,
    fit_mlp,
    predict_logits,
)
from adapters.tuning import kfold_applies, tune
from harness.sample_data import fashion_mnist_pngs
from service.errors import Cancelled, InvalidArgument, NotFound
from service.training import TrainRequest, adapter_errors_translated

REPO = Path(__file__).resolve().parents[2]
DIGIT_CLASSES = [str(d) for d in range(10)]


class Digits:
    """The 8x8 digits as 64-d "pooled features" and as [N, 1, 8, 8] "feature maps"."""

    def __init__(self) -> None:
        features, labels = load_digits(return_X_y=True)
        self.train_idx, self.holdout_idx = stratified_split(labels.tolist(), holdout_fraction=0.2, seed=0)
        self.x = torch.tensor(features, dtype=torch.float32)
        self.y = torch.tensor(labels, dtype=torch.int64)

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[self.train_idx], self.y[self.train_idx], self.x[self.holdout_idx], self.y[self.holdout_idx]

    def maps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        images = (self.x / 16.0).reshape(-1, 1, 8, 8)
        return images[self.train_idx], self.y[self.train_idx], images[self.holdout_idx], self.y[self.holdout_idx]


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


def tiny_tail() -> nn.Module:
    """A stand-in for the backbone's last blocks: conv + batchnorm + relu, twice."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
    )


LINEAR = HeadConfig(kind=HeadKind.LINEAR, in_features=64, num_classes=10)
MLP = HeadConfig(kind=HeadKind.MLP, in_features=64, num_classes=10, hidden=128)
FINETUNE = HeadConfig(kind=HeadKind.FINETUNE, in_features=1, num_classes=10, tail_blocks=2, tail_out_channels=32)
FAST_MLP = get_kind(HeadKind.MLP).hyperparams.model_copy(update={"epochs": 20})
FAST_FINETUNE = get_kind(HeadKind.FINETUNE).hyperparams.model_copy(update={"epochs": 6})


@pytest.fixture(scope="module")
def linear_head(digits: Digits) -> nn.Module:
    x_train, y_train, _, _ = digits.pooled()
    head = build_head(LINEAR)
    fit_linear(head, x_train, y_train, get_kind(HeadKind.LINEAR).hyperparams)
    return head


@pytest.fixture(scope="module")
def mlp_head(digits: Digits) -> nn.Module:
    x_train, y_train, x_val, y_val = digits.pooled()
    head = build_head(MLP)
    fit_mlp(head, x_train, y_train, FAST_MLP, x_val=x_val, y_val=y_val)
    return head


@pytest.fixture(scope="module")
def finetune_head(digits: Digits) -> nn.Module:
    x_train, y_train, x_val, y_val = digits.maps()
    head = build_head(FINETUNE, tiny_tail())
    fit_finetune(head, x_train, y_train, FAST_FINETUNE, x_val=x_val, y_val=y_val)
    return head


# --- splits -------------------------------------------------------------------------


def test_stratified_split_puts_every_class_on_both_sides() -> None:
    labels = [0] * 10 + [1] * 2 + [2] * 50
    train_idx, holdout_idx = stratified_split(labels, holdout_fraction=0.2, seed=3)

    labels_array = np.array(labels)
    assert set(labels_array[train_idx]) == {0, 1, 2}
    assert set(labels_array[holdout_idx]) == {0, 1, 2}
    assert sorted(np.concatenate([train_idx, holdout_idx]).tolist()) == list(range(len(labels)))


def test_stratified_split_sends_a_singleton_class_to_train() -> None:
    labels = [0] * 10 + [1]
    train_idx, holdout_idx = stratified_split(labels)
    assert 10 in train_idx
    assert 10 not in holdout_idx


def test_stratified_split_is_deterministic_for_a_seed() -> None:
    labels = np.random.default_rng(0).integers(0, 5, size=200).tolist()
    first = stratified_split(labels, seed=7)
    second = stratified_split(labels, seed=7)
    other_seed = stratified_split(labels, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[1], other_seed[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, float("nan")])
def test_stratified_split_rejects_a_fraction_outside_zero_one(fraction: float) -> None:
    with pytest.raises(InvalidInput):
        stratified_split([0, 0, 1, 1], holdout_fraction=fraction)


# --- head configs ---------------------------------------------------------------------


def test_head_config_defaults_dropout_by_kind() -> None:
    assert LINEAR.dropout == 0.0
    assert MLP.dropout == 0.2
    assert FINETUNE.dropout == 0.2


def test_head_config_round_trips_through_json() -> None:
    for config in (LINEAR, MLP, FINETUNE):
        assert HeadConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "mlp", "in_features": 64, "num_classes": 10},  # no hidden
        {"kind": "linear", "in_features": 64, "num_classes": 10, "hidden": 32},
        {"kind": "linear", "in_features": 64, "num_classes": 10, "dropout": 0.5},
        {"kind": "finetune", "in_features": 8, "num_classes": 10, "tail_blocks": 1},  # no tail_out_channels
        {"kind": "mlp", "in_features": 64, "num_classes": 10, "hidden": 32, "dropout": float("nan")},
        {"kind": "linear", "in_features": 64, "num_classes": 1},
    ],
)
def test_head_config_rejects_fields_that_do_not_fit_the_kind(fields: dict) -> None:
    with pytest.raises(ValidationError):
        HeadConfig(**fields)


def test_building_a_finetune_head_without_a_tail_is_rejected() -> None:
    with pytest.raises(InvalidInput):
        build_head(FINETUNE)


# --- training quality -----------------------------------------------------------------


def test_linear_head_learns_digits(digits: Digits, linear_head: nn.Module) -> None:
    _, _, x_val, y_val = digits.pooled()
    assert accuracy(predict_logits(linear_head, x_val), y_val) >= 0.85


def test_linear_head_matches_sklearn_logistic_regression(digits: Digits, linear_head: nn.Module) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    weight_decay = get_kind(HeadKind.LINEAR).hyperparams.weight_decay
    scaler = StandardScaler().fit(x_train.numpy())
    reference = LogisticRegression(C=1.0 / (weight_decay * len(y_train)), max_iter=5000)
    reference.fit(scaler.transform(x_train.numpy()), y_train.numpy())

    sklearn_accuracy = reference.score(scaler.transform(x_val.numpy()), y_val.numpy())
    ours = accuracy(predict_logits(linear_head, x_val), y_val)
    assert abs(ours - sklearn_accuracy) <= 0.015


def test_mlp_head_learns_digits(digits: Digits, mlp_head: nn.Module) -> None:
    _, _, x_val, y_val = digits.pooled()
    assert accuracy(predict_logits(mlp_head, x_val), y_val) >= 0.85


def test_finetune_head_learns_digit_feature_maps(digits: Digits, finetune_head: nn.Module) -> None:
    _, _, x_val, y_val = digits.maps()
    assert accuracy(predict_logits(finetune_head, x_val), y_val) > 0.5


def test_fit_reports_validation_accuracy_and_returns_an_eval_mode_head(digits: Digits) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    head = build_head(MLP)
    result = fit_mlp(head, x_train, y_train, FAST_MLP.model_copy(update={"epochs": 3}), x_val=x_val, y_val=y_val)
    assert result.best_val_accuracy is not None and 0.0 < result.best_val_accuracy <= 1.0
    assert 1 <= result.epochs_run <= 3
    assert not head.training


def test_fit_trains_on_features_made_under_inference_mode(digits: Digits) -> None:
    x_train, y_train, _, _ = digits.pooled()
    head = build_head(LINEAR)
    with torch.inference_mode():
        frozen_features = x_train * 1.0
        result = fit_linear(head, frozen_features, y_train, get_kind(HeadKind.LINEAR).hyperparams)
    assert math.isfinite(result.train_loss)


def test_fit_is_deterministic_for_a_seed(digits: Digits) -> None:
    x_train, y_train, x_val, _ = digits.pooled()
    hp = FAST_MLP.model_copy(update={"epochs": 2})
    logits = []
    for _ in range(2):
        torch.manual_seed(0)
        head = build_head(MLP)
        fit_mlp(head, x_train, y_train, hp, seed=5)
        logits.append(predict_logits(head, x_val))
    assert torch.equal(logits[0], logits[1])


def test_fit_rejects_labels_outside_the_head_classes(digits: Digits) -> None:
    x_train, y_train, _, _ = digits.pooled()
    with pytest.raises(InvalidInput):
        fit_linear(build_head(LINEAR), x_train, y_train + 10, get_kind(HeadKind.LINEAR).hyperparams)


# --- the linear head's folded form and storage ---------------------------------------


def test_gathered_weights_reproduce_the_forward_logits(digits: Digits, linear_head: LinearHead) -> None:
    _, _, x_val, _ = digits.pooled()
    weight, bias, centre = linear_head.gathered()
    assert centre is None  # a per-feature scaling folds into the weights whole
    torch.testing.assert_close(x_val @ weight.T + bias, predict_logits(linear_head, x_val), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scaling", ["none", "standardise", "l2"])
def test_every_scaling_gathers_into_the_engines_matmul_with_the_forward_logits(digits: Digits, scaling: str) -> None:
    x_train, y_train, x_val, _ = digits.pooled()
    head = build_head(LINEAR.model_copy(update={"scaling": Scaling(scaling)}))
    fit_linear(head, x_train, y_train, get_kind(HeadKind.LINEAR).hyperparams)
    weight, bias, centre = head.gathered()
    inputs = x_val if centre is None else normalised(x_val, centre)  # as the engine feeds a gathered head
    torch.testing.assert_close(inputs @ weight.T + bias, predict_logits(head, x_val), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp", "finetune"])
def test_saved_head_reloads_with_identical_logits(kind: str, request: pytest.FixtureRequest, digits: Digits) -> None:
    head = request.getfixturevalue(f"{kind}_head")
    config = {"linear": LINEAR, "mlp": MLP, "finetune": FINETUNE}[kind]
    tail = tiny_tail() if kind == "finetune" else None
    _, _, x_val, _ = digits.maps() if kind == "finetune" else digits.pooled()

    stored = save_safetensors(head_state(head))
    reloaded = load_head(HeadConfig.model_validate_json(config.model_dump_json()), load_safetensors(stored), tail)

    assert not reloaded.training
    assert torch.equal(predict_logits(reloaded, x_val), predict_logits(head, x_val))


def test_loading_weights_of_another_shape_is_rejected(linear_head: nn.Module) -> None:
    wider = HeadConfig(kind=HeadKind.LINEAR, in_features=32, num_classes=10)
    with pytest.raises(InvalidInput):
        load_head(wider, head_state(linear_head))


# --- metrics ----------------------------------------------------------------------------


def one_hot_logits(predicted: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).float() * 10.0


def test_evaluate_counts_a_known_confusion() -> None:
    true = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = [0, 0, 1, 1, 0, 2]
    metrics = evaluate(one_hot_logits(predicted, 3), true, ["cat", "dog", "eel"])

    assert metrics.confusion == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert metrics.accuracy == pytest.approx(4 / 6)
    assert metrics.num_examples == 6
    cat, dog, eel = metrics.per_class
    assert (cat.label, cat.support) == ("cat", 3)
    assert cat.precision == pytest.approx(2 / 3) and cat.recall == pytest.approx(2 / 3)
    assert dog.precision == pytest.approx(1 / 2) and dog.recall == pytest.approx(1 / 2)
    assert dog.f1 == pytest.approx(1 / 2)
    assert (eel.precision, eel.recall, eel.f1) == (1.0, 1.0, 1.0)


def test_evaluate_gives_zero_not_nan_for_a_class_never_predicted() -> None:
    metrics = evaluate(one_hot_logits([0, 0, 0], 2), torch.tensor([0, 1, 1]), ["a", "b"])
    b = metrics.per_class[1]
    assert (b.precision, b.recall, b.f1) == (0.0, 0.0, 0.0)
    assert all(math.isfinite(value) for c in metrics.per_class for value in (c.precision, c.recall, c.f1))


def test_evaluate_finds_no_calibration_error_when_confidence_matches_accuracy() -> None:
    # Every prediction is class 0 with confidence 0.75, and 3 of 4 are right.
    logits = torch.tensor([[math.log(3.0), 0.0]] * 4)
    metrics = evaluate(logits, torch.tensor([0, 0, 0, 1]), ["a", "b"])
    assert metrics.ece == pytest.approx(0.0, abs=1e-6)
    assert metrics.loss == pytest.approx(-(3 * math.log(0.75) + math.log(0.25)) / 4, rel=1e-5)


def test_evaluate_measures_overconfidence() -> None:
    # Confidence ~1.0 but only half right: the calibration error is ~0.5.
    metrics = evaluate(one_hot_logits([0, 0, 0, 0], 2), torch.tensor([0, 0, 1, 1]), ["a", "b"])
    assert metrics.ece == pytest.approx(0.5, abs=1e-3)


def test_finite_turns_nan_and_infinity_into_none_at_any_depth() -> None:
    metrics = {"loss": math.nan, "ece": 0.1, "trials": [{"val_loss": math.inf, "val_accuracy": 0.5}], "n": 3}
    assert finite(metrics) == {"loss": None, "ece": 0.1, "trials": [{"val_loss": None, "val_accuracy": 0.5}], "n": 3}


def test_evaluate_rejects_logits_that_do_not_match_the_class_names() -> None:
    with pytest.raises(InvalidInput):
        evaluate(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), ["a", "b"])


# --- hyperparameters and search spaces ------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"lr": -0.1},
        {"lr": 0.0},
        {"lr": 11.0},
        {"weight_decay": -1e-4},
        {"weight_decay": float("nan")},
        {"epochs": 0},
        {"epochs": 501},
        {"batch_size": 0},
        {"batch_size": 5000},
        {"hidden": 0},
        {"label_smoothing": 0.5},
        {"patience": 0},
    ],
)
def test_hyperparams_reject_unsafe_values(override: dict) -> None:
    with pytest.raises(ValidationError):
        HyperParams.model_validate(get_kind(HeadKind.MLP).hyperparams.model_dump() | override)


@pytest.mark.parametrize(
    "fields",
    [
        {"lr": [float("nan")], "weight_decay": [0.0]},
        {"lr": [1e-3], "weight_decay": [float("inf")]},
        {"lr": [-1e-3], "weight_decay": [0.0]},
        {"lr": [], "weight_decay": [0.0]},
        {"lr": [1e-3], "weight_decay": [0.0], "hidden": [0]},
        {"lr": [1e-3] * (MAX_GRID_VALUES + 1), "weight_decay": [0.0]},
        {"lr": [1e-3], "weight_decay": [0.0], "max_trials": 65},
    ],
)
def test_search_space_rejects_unsafe_or_oversized_grids(fields: dict) -> None:
    with pytest.raises(ValidationError):
        SearchSpace(**fields)


def test_default_search_spaces_have_the_documented_sizes() -> None:
    assert len(get_kind(HeadKind.LINEAR).search_space.points()) == 5  # decades; the k-fold search extends them
    assert len(get_kind(HeadKind.MLP).search_space.points()) == 8
    assert len(get_kind(HeadKind.FINETUNE).search_space.points()) == 2


def test_a_billion_point_search_grid_is_refused_without_building_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_enumeration(*args: object) -> None:
        raise AssertionError("the search grid was enumerated")

    monkeypatch.setattr(itertools, "product", no_enumeration)
    with pytest.raises(ValidationError, match=f"at most {MAX_GRID_VALUES} items"):
        SearchSpace(lr=[0.1] * 1000, weight_decay=[0.1] * 1000, hidden=[8] * 1000)


def test_a_grid_larger_than_max_trials_trains_the_same_sample_of_max_trials_points() -> None:
    values = range(1, MAX_GRID_VALUES + 1)
    fields = {"lr": [v / 1000 for v in values], "weight_decay": [v / 100 for v in values], "hidden": list(values)}
    space = SearchSpace(**fields)  # 64 x 64 x 64 = 262,144 points

    points = space.points()
    assert space.size == MAX_GRID_VALUES**3 and space.trials == len(points) == space.max_trials
    assert len(set(points)) == len(points)
    assert all(lr in space.lr and wd in space.weight_decay and h in space.hidden for lr, wd, h in points)
    assert SearchSpace(**fields).points() == points  # a fixed sample: the same request trains the same trials
    assert len(SearchSpace(**fields, max_trials=5).points()) == 5


def test_a_grid_within_max_trials_is_tried_whole_in_grid_order() -> None:
    space = SearchSpace(lr=[1e-3, 1e-2], weight_decay=[0.0, 1e-4, 1e-3], hidden=[8, 16])
    assert space.points() == list(itertools.product(space.lr, space.weight_decay, space.hidden))
    assert space.trials == space.size == 12


# --- cancellation -----------------------------------------------------------------------


def test_fit_raises_cancelled_when_asked_to_stop(digits: Digits) -> None:
    x_train, y_train, _, _ = digits.pooled()
    with pytest.raises(TrainingCancelled):
        fit_mlp(build_head(MLP), x_train, y_train, FAST_MLP, cancelled=lambda: True)


def test_a_minibatch_fit_stops_within_its_epoch_when_cancelled(digits: Digits) -> None:
    x_train, y_train, _, _ = digits.pooled()
    checks = itertools.count()
    epochs_reported: list[ProgressEvent] = []
    one_long_epoch = FAST_MLP.model_copy(update={"epochs": 1, "batch_size": 8})  # ~180 mini-batches

    with pytest.raises(TrainingCancelled):
        fit_mlp(
            build_head(MLP),
            x_train,
            y_train,
            one_long_epoch,
            cancelled=lambda: next(checks) >= 3,
            progress=epochs_reported.append,
        )
    assert epochs_reported == []  # stopped before its only epoch ended


def test_a_linear_fit_stops_within_an_l_bfgs_round_when_cancelled(digits: Digits) -> None:
    x_train, y_train, _, _ = digits.pooled()
    checks = itertools.count()
    one_round = get_kind(HeadKind.LINEAR).hyperparams.model_copy(update={"epochs": 1})
    rounds_reported: list[ProgressEvent] = []

    with pytest.raises(TrainingCancelled):
        fit_linear(
            build_head(LINEAR),
            x_train,
            y_train,
            one_round,
            cancelled=lambda: next(checks) >= 3,
            progress=rounds_reported.append,
        )
    assert rounds_reported == []


def test_tune_raises_cancelled_once_a_stop_is_requested(digits: Digits) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    polls = iter(range(1000))

    def stop() -> bool:
        return next(polls) >= 3

    with pytest.raises(TrainingCancelled):
        tune(LINEAR, x_train, y_train, x_val, y_val, space=get_kind(HeadKind.LINEAR).search_space, cancelled=stop)


# --- tuning -----------------------------------------------------------------------------


SMALL_LINEAR_SPACE = SearchSpace(lr=[1.0], weight_decay=[1e-3, 2e-2, 1.0])


def test_a_linear_search_scores_every_recipe_by_k_folds_and_reports_progress(digits: Digits) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    events: list[ProgressEvent] = []
    result = tune(
        LINEAR,
        x_train,
        y_train,
        x_val,
        y_val,
        space=SMALL_LINEAR_SPACE,
        scalings=["none", "standardise", "l2"],
        class_weightings=["none", "balanced"],
        progress=events.append,
    )

    tried = {(trial.scaling, trial.class_weighting, trial.hp.weight_decay) for trial in result.trials}
    assert {
        (s, w, d) for s in ("none", "standardise", "l2") for w in ("none", "balanced") for d in (1e-3, 2e-2, 1.0)
    } <= tried
    assert all(trial.cv_folds is not None and len(trial.cv_folds) == 5 for trial in result.trials)
    assert all(trial.val_accuracy == pytest.approx(np.mean(trial.cv_folds or [])) for trial in result.trials)
    assert result.search is not None and result.search.folds == 5
    chosen = result.search.chosen
    assert (result.config.scaling.value, result.class_weighting, result.best.weight_decay) == (
        chosen.scaling,
        chosen.class_weighting,
        chosen.weight_decay,
    )
    assert accuracy(predict_logits(result.head, x_val), y_val) >= 0.9

    fractions = [event.fraction for event in events]
    assert all(event.phase == "search" for event in events)
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    assert "one standard error" in events[-1].message


def test_a_cross_validated_search_returns_the_winner_fitted_on_the_whole_training_split(digits: Digits) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    result = tune(LINEAR, x_train, y_train, x_val, y_val, space=SMALL_LINEAR_SPACE, class_weightings=["balanced"])

    assert result.class_weighting == "balanced"
    refit = build_head(result.config)
    fit_linear(refit, x_train, y_train, result.best, class_weights=class_weights(y_train, 10, "balanced"))
    # The same convex problem, fit from another start (the folds' average) to the same gradient tolerance.
    fitted, again = predict_logits(result.head, x_val), predict_logits(refit, x_val)
    torch.testing.assert_close(fitted, again, atol=0.1, rtol=0)
    assert torch.equal(fitted.argmax(1), again.argmax(1))


def test_the_hold_out_chooses_nothing_in_a_cross_validated_search(digits: Digits) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    honest = tune(LINEAR, x_train, y_train, x_val, y_val, space=SMALL_LINEAR_SPACE)
    scrambled = tune(LINEAR, x_train, y_train, x_val, (y_val + 1) % 10, space=SMALL_LINEAR_SPACE)

    assert honest.trials == scrambled.trials
    assert torch.equal(predict_logits(honest.head, x_val), predict_logits(scrambled.head, x_val))


def test_a_linear_search_with_a_class_of_one_training_example_keeps_the_best_trial_on_the_hold_out(
    digits: Digits,
) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    keep = torch.cat([torch.nonzero(y_train != 0).flatten(), torch.nonzero(y_train == 0).flatten()[:1]])
    result = tune(LINEAR, x_train[keep], y_train[keep], x_val, y_val, space=SMALL_LINEAR_SPACE)

    assert all(trial.cv_folds is None for trial in result.trials)
    best_accuracy = max(trial.val_accuracy for trial in result.trials)
    assert result.best in [trial.hp for trial in result.trials if trial.val_accuracy == best_accuracy]
    assert accuracy(predict_logits(result.head, x_val), y_val) == pytest.approx(best_accuracy)


def test_k_folds_validate_linear_searches_only() -> None:
    two_each = torch.tensor([0, 0, 1, 1])
    assert kfold_applies(LINEAR, two_each)
    assert not kfold_applies(LINEAR, torch.tensor([0, 0, 1]))  # a single example of a class cannot be validated
    assert not kfold_applies(MLP, two_each)  # an mlp trial is a full training run, not one solver run


def test_tune_of_an_mlp_returns_the_config_of_the_winning_width(digits: Digits) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    space = SearchSpace(lr=[3e-3], weight_decay=[1e-4], hidden=[4, 64])
    result = tune(MLP, x_train, y_train, x_val, y_val, space=space, base=FAST_MLP.model_copy(update={"epochs": 4}))

    assert [trial.hp.hidden for trial in result.trials] == [4, 64]
    assert result.config.hidden == result.best.hidden
    reloaded = load_head(result.config, head_state(result.head))
    assert torch.equal(predict_logits(reloaded, x_val), predict_logits(result.head, x_val))


def test_tune_keeps_a_diverged_trial_without_a_loss_and_picks_a_converged_one(digits: Digits) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    events: list[ProgressEvent] = []
    space = SearchSpace(lr=[10.0, 1e-3], weight_decay=[10.0])  # lr x weight_decay = 100: AdamW blows up
    result = tune(
        MLP,
        x_train,
        y_train,
        x_val,
        y_val,
        space=space,
        base=FAST_MLP.model_copy(update={"epochs": 3}),
        progress=events.append,
    )

    diverged, converged = result.trials
    assert diverged.val_loss is None and converged.val_loss is not None and math.isfinite(converged.val_loss)
    assert result.best == converged.hp
    json.dumps([trial.model_dump(mode="json") for trial in result.trials], allow_nan=False)
    assert "trial 1/2 diverged" in {event.message for event in events}


def test_tune_refuses_a_search_whose_every_trial_diverges(digits: Digits) -> None:
    x_train, y_train, x_val, y_val = digits.pooled()
    with pytest.raises(InvalidInput, match="all 1 trials diverged.*smaller lr"):
        tune(
            MLP,
            x_train,
            y_train,
            x_val,
            y_val,
            space=SearchSpace(lr=[10.0], weight_decay=[10.0]),
            base=FAST_MLP.model_copy(update={"epochs": 3}),
        )


def test_tune_of_a_finetune_head_needs_a_tail_factory(digits: Digits) -> None:
    x_train, y_train, x_val, y_val = digits.maps()
    with pytest.raises(InvalidInput):
        tune(FINETUNE, x_train, y_train, x_val, y_val, space=get_kind(HeadKind.FINETUNE).search_space)


# --- class weights ------------------------------------------------------------------------


def test_class_weights_are_inverse_frequency_with_mean_one() -> None:
    weights = class_weights(torch.tensor([0, 0, 0, 1]), 2, "balanced")
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.5]))


def test_class_weights_raise_minority_recall_on_an_imbalanced_problem() -> None:
    generator = torch.Generator().manual_seed(0)

    def sample(majority: int, minority: int) -> tuple[torch.Tensor, torch.Tensor]:
        common = torch.randn(majority, 4, generator=generator)
        rare = torch.randn(minority, 4, generator=generator) + 1.0
        x = torch.cat([common, rare])
        y = torch.cat([torch.zeros(majority, dtype=torch.int64), torch.ones(minority, dtype=torch.int64)])
        return x, y

    x_train, y_train = sample(1000, 30)
    x_test, y_test = sample(500, 500)
    config = HeadConfig(kind=HeadKind.LINEAR, in_features=4, num_classes=2)
    hp = get_kind(HeadKind.LINEAR).hyperparams

    def minority_recall(class_weights: torch.Tensor | None) -> float:
        head = build_head(config)
        fit_linear(head, x_train, y_train, hp, class_weights=class_weights)
        return evaluate(predict_logits(head, x_test), y_test, ["common", "rare"]).per_class[1].recall

    assert minority_recall(class_weights(y_train, 2, "balanced")) > minority_recall(None) + 0.2


# --- adapters' own errors, and the one place the service translates them ------------------


def test_no_adapter_module_imports_the_service() -> None:
    """adapters/ is a library of heads: it must work, and be tested, without the service."""
    offenders = []
    for path in sorted((REPO / "adapters").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno} imports {module}"
                for module in modules
                if module == "service" or module.startswith("service.")
            ]
    assert offenders == []


def test_an_adapter_refusal_becomes_the_cores_invalid_argument_with_its_message_and_details() -> None:
    with (
        pytest.raises(InvalidArgument, match="holdout_fraction must be between 0 and 1") as refused,
        adapter_errors_translated(),
    ):
        stratified_split([0, 1, 0, 1], holdout_fraction=1.5)
    assert refused.value.code == "invalid_argument"
    assert refused.value.details == {"holdout_fraction": 1.5}
    assert isinstance(refused.value.__cause__, InvalidInput)


@pytest.fixture(scope="module")
def core(tmp_path_factory, make_core):
    return make_core(tmp_path_factory.mktemp("graft"))


@pytest.fixture(scope="module")
def fashion(core):
    files = fashion_mnist_pngs("train", per_class=3, seed=5)
    return core.datasets.create("acme", "fashion", [(f"{i}.png", data, label) for i, (data, label) in enumerate(files)])


def test_a_search_whose_every_trial_diverges_reaches_the_client_as_invalid_argument(core, fashion) -> None:
    one_step_per_image = {**get_kind(HeadKind.MLP).hyperparams.model_dump(), "epochs": 3, "batch_size": 1}
    request = TrainRequest(
        dataset_id=fashion.id,
        head_name="diverges",
        kind=HeadKind.MLP,
        search=SearchSpace(lr=[10.0], weight_decay=[10.0]),  # lr x weight_decay = 100
        hyperparams=one_step_per_image,
    )
    with pytest.raises(InvalidArgument, match="all 1 trials diverged") as refused:
        core.trainer.train("acme", request)
    assert refused.value.code == "invalid_argument"
    assert isinstance(refused.value.__cause__, InvalidInput)


def test_a_stop_asked_for_during_fitting_reaches_the_client_as_cancelled(core, fashion) -> None:
    fitting = []  # set once the features are extracted: the stop comes from the adapters, not the extractor
    request = TrainRequest(
        dataset_id=fashion.id,
        head_name="stopped",
        kind=HeadKind.MLP,
        search=SearchSpace(lr=[1e-3], weight_decay=[1e-4]),
    )
    with pytest.raises(Cancelled) as stopped:
        core.trainer.train(
            "acme",
            request,
            cancelled=lambda: bool(fitting),
            progress=lambda event: fitting.append(event) if event.phase != "extract" else None,
        )
    assert stopped.value.code == "cancelled"
    assert isinstance(stopped.value.__cause__, TrainingCancelled)
    with pytest.raises(NotFound):
        core.heads.get("acme", "stopped")
