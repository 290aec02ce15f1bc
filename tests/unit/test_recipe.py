"""The linear recipe: its registries, the side-by-side logistic-regression solver, and the k-fold recipe search."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from adapters.crossval import search_linear
from adapters.errors import InvalidInput, TrainingCancelled
from adapters.heads import LinearHead
from adapters.kinds import HeadKind
from adapters.logistic import solve
from adapters.recipe import (
    CLASS_WEIGHTINGS,
    OBJECTIVES,
    SCALINGS,
    ClassWeighting,
    Objective,
    Scaling,
    class_weights,
    get_objective,
    scaled,
    scaling_stats,
    score,
)
from service.training import TrainRequest


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:600], dtype=torch.float32), torch.tensor(y[:600])


def objective(x, y, weight, bias, weight_decay: float, rows: torch.Tensor | None = None) -> float:
    """The solver's objective: the row-weighted cross-entropy plus weight_decay / 2 x ||W||^2, in float64."""
    losses = torch.nn.functional.cross_entropy(x.double() @ weight.double().T + bias.double(), y, reduction="none")
    weights = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64) if rows is None else rows.double()
    return float((weights * losses).sum() + weight_decay / 2 * weight.double().square().sum())


def uniform(n: int, problems: int = 1) -> torch.Tensor:
    return torch.full((problems, n), 1.0 / n)


def test_every_registry_is_the_enum_the_api_uses_in_order_of_simplicity():
    assert [s.value for s in Scaling] == list(SCALINGS) == ["none", "standardise", "l2"]
    assert [w.value for w in ClassWeighting] == list(CLASS_WEIGHTINGS) == ["none", "balanced"]
    assert [o.value for o in Objective] == list(OBJECTIVES) == ["accuracy", "balanced_accuracy"]
    assert all(spec.class_weighting in CLASS_WEIGHTINGS for spec in OBJECTIVES.values())


def test_each_scaling_computes_what_it_says(digits):
    x, _ = digits
    none = scaled(x, "none", *scaling_stats(x, "none"))
    standard = scaled(x, "standardise", *scaling_stats(x, "standardise"))
    unit = scaled(x, "l2", *scaling_stats(x, "l2"))
    assert torch.equal(none, x)
    varying = x.std(0) > 1e-6
    torch.testing.assert_close(standard.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(standard.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())))
    torch.testing.assert_close(unit.norm(dim=1), torch.full((len(x),), 8.0))  # sqrt(64)


def test_balanced_accuracy_weighs_every_class_the_same():
    y = torch.tensor([0, 0, 0, 0, 1])
    predicted = torch.zeros(5, dtype=torch.int64)  # right on the common class, wrong on the rare one
    assert score("accuracy", predicted, y, 2) == pytest.approx(0.8)
    assert score("balanced_accuracy", predicted, y, 2) == pytest.approx(0.5)


def test_an_unknown_recipe_value_is_refused_with_the_known_ones():
    with pytest.raises(InvalidInput, match="unknown objective 'f1'; known: accuracy, balanced_accuracy"):
        get_objective("f1")


@pytest.mark.parametrize("weight_decay", [1e-3, 1e-1])
def test_the_solver_matches_scikit_learn_logistic_regression(digits, weight_decay):
    x, y = digits
    n = len(y)
    reference = LogisticRegression(C=1.0 / (weight_decay * n), max_iter=10_000, tol=1e-8).fit(x.numpy(), y.numpy())
    decay = torch.tensor([weight_decay])
    solution = solve(x, y, 10, uniform(n), decay, dtype=torch.float64, tolerance=1e-12, max_iterations=5000)
    ours = solution.logits(x)[0].argmax(1).numpy()
    assert (ours == reference.predict(x.numpy())).mean() >= 0.995
    # The objective is flat along some pixel directions, so the two answers are compared where it is not.
    theirs = objective(x, y, torch.tensor(reference.coef_), torch.tensor(reference.intercept_), weight_decay)
    assert objective(x, y, solution.weight[0], solution.bias[0], weight_decay) <= theirs + 1e-6


def test_problems_solved_side_by_side_equal_each_solved_alone(digits):
    x, y = digits
    n = len(y)
    fold = torch.arange(n) % 3 != 0
    rows = torch.stack([torch.full((n,), 1.0 / n), fold.float() / fold.sum()])
    decays = torch.tensor([1e-2, 1e-1])
    together = solve(x, y, 10, rows, decays, dtype=torch.float64, tolerance=1e-10)
    for p in range(2):
        alone = solve(x, y, 10, rows[p : p + 1], decays[p : p + 1], dtype=torch.float64, tolerance=1e-10)
        pair = [
            objective(x, y, s.weight[i], s.bias[i], float(decays[p]), rows[p]) for s, i in ((together, p), (alone, 0))
        ]
        assert pair[0] == pytest.approx(pair[1], rel=1e-6)
        assert torch.equal(together.logits(x)[p].argmax(1), alone.logits(x)[0].argmax(1))


def test_a_warm_start_at_the_answer_stops_at_once(digits):
    x, y = digits
    cold = solve(x, y, 10, uniform(len(y)), torch.tensor([1e-2]), tolerance=1e-8)
    warm = solve(x, y, 10, uniform(len(y)), torch.tensor([1e-2]), start=cold, tolerance=1e-6)
    assert int(warm.iterations[0]) <= 2 < int(cold.iterations[0])
    torch.testing.assert_close(warm.logits(x), cold.logits(x), atol=1e-3, rtol=1e-3)


def test_a_final_fit_stops_on_its_gradient_so_a_warm_start_reaches_the_cold_answer(digits):
    x, y = digits
    decay, rule = torch.tensor([1e-2]), {"dtype": torch.float64, "tolerance": 1e-12, "gradient_tolerance": 3e-4}
    cold = solve(x, y, 10, uniform(len(y)), decay, **rule)
    near = solve(x[:500], y[:500], 10, uniform(500), decay, **rule)  # the answer on most of the same rows
    warm = solve(x, y, 10, uniform(len(y)), decay, start=near, **rule)
    assert 0 < int(warm.iterations[0]) < int(cold.iterations[0])
    values = [objective(x, y, s.weight[0], s.bias[0], 1e-2) for s in (cold, warm)]
    assert values[1] == pytest.approx(values[0], rel=1e-4)
    again = solve(x, y, 10, uniform(len(y)), decay, start=warm, **rule)
    assert int(again.iterations[0]) == 0 and torch.equal(again.weight, warm.weight)


def test_the_solver_stops_when_cancelled(digits):
    x, y = digits
    with pytest.raises(TrainingCancelled):
        solve(x, y, 10, uniform(len(y)), torch.tensor([1e-3]), cancelled=lambda: True)


def test_the_solver_refuses_problems_of_the_wrong_shape(digits):
    x, y = digits
    with pytest.raises(InvalidInput, match="row_weights must be"):
        solve(x, y, 10, uniform(len(y) - 1), torch.tensor([1e-3]))


def imbalanced() -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping classes, 20 to 1: plain accuracy favours the common one, balanced accuracy the rare."""
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(400, 6, generator=generator), torch.randn(20, 6, generator=generator) + 1.2])
    return x, torch.cat([torch.zeros(400, dtype=torch.int64), torch.ones(20, dtype=torch.int64)])


def test_the_objective_decides_the_class_weighting_a_search_prefers():
    x, y = imbalanced()
    options = {"scalings": ["standardise"], "class_weightings": ["none", "balanced"], "weight_decays": [1e-2, 0.1]}
    plain = search_linear(x, y, 2, objective="accuracy", **options)
    fair = search_linear(x, y, 2, objective="balanced_accuracy", **options)
    assert plain.chosen.class_weighting == "none"
    assert fair.chosen.class_weighting == "balanced"
    assert fair.chosen.scores.balanced_accuracy > plain.chosen.scores.balanced_accuracy
    scored = {(c.class_weighting, c.weight_decay) for c in fair.candidates}
    assert {("none", 1e-2), ("balanced", 1e-2), ("none", 0.1), ("balanced", 0.1)} <= scored


def test_a_search_reports_every_candidate_with_its_folds_and_the_rule(digits):
    x, y = digits
    search = search_linear(
        x, y, 10, scalings=list(SCALINGS), class_weightings=["none"], weight_decays=[1e-2, 1.0], objective="accuracy"
    )
    report = search.report()
    assert report["folds"] == 5 and report["objective"] == "accuracy"
    assert {c["scaling"] for c in report["candidates"]} == set(SCALINGS)
    assert all(len(c["folds"]) == 5 and c["mean"] == pytest.approx(np.mean(c["folds"])) for c in report["candidates"])
    assert "one standard error" in report["rule"]
    assert search.out_of_fold_logits.shape == (len(y), 10)


def test_the_rule_judges_each_configuration_at_its_own_best_weight_decay(digits):
    x, y = digits
    decays = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    search = search_linear(
        x, y, 10, scalings=list(SCALINGS), class_weightings=["none"], weight_decays=decays, objective="accuracy"
    )
    by_configuration: dict[str, list] = {}
    for candidate in search.candidates:
        by_configuration.setdefault(candidate.scaling, []).append(candidate)
    best = {scaling: max(c.scores.mean for c in group) for scaling, group in by_configuration.items()}
    assert search.chosen.scores.mean == best[search.chosen.scaling]  # the weight decay is tuned, not judged
    simpler = list(SCALINGS)[: list(SCALINGS).index(search.chosen.scaling)]
    assert all(best[scaling] < max(best.values()) for scaling in simpler)  # a simpler one is chosen only if it ties


def test_a_kept_search_with_the_same_key_is_reread_not_searched_again(digits):
    x, y = digits
    options = {"scalings": ["none", "l2"], "class_weightings": ["none"], "weight_decays": [1e-2, 1.0]}
    searched = search_linear(x, y, 10, objective="accuracy", **options)
    kept = {searched.key: searched.report()}
    asked: list[str] = []

    def evidence(key: str) -> dict | None:
        asked.append(key)
        return kept.get(key)

    reread = search_linear(x, y, 10, objective="accuracy", evidence=evidence, **options)
    assert asked == [searched.key] and reread.reread and not searched.reread
    assert reread.report()["evidence"].startswith("reread") and searched.report()["evidence"] == "searched"
    assert reread.chosen == searched.chosen and reread.candidates == searched.candidates
    assert reread.rule == searched.rule
    torch.testing.assert_close(reread.out_of_fold_logits, searched.out_of_fold_logits, atol=1e-3, rtol=1e-3)
    relabelled = y.clone()
    relabelled[0] = (relabelled[0] + 1) % 10
    other = search_linear(x, relabelled, 10, objective="accuracy", evidence=evidence, **options)
    stronger = search_linear(x, y, 10, objective="accuracy", evidence=evidence, **options | {"weight_decays": [1.0]})
    assert len({searched.key, other.key, stronger.key}) == 3
    assert not other.reread and not stronger.reread


def test_balanced_weights_on_classes_of_equal_size_pose_the_same_problems_once(digits):
    x, y = digits
    keep = torch.cat([torch.nonzero(y == c).flatten()[:50] for c in range(10)])  # 50 of each class: 40 per fold fit
    search = search_linear(
        x[keep],
        y[keep],
        10,
        scalings=["standardise"],
        class_weightings=["none", "balanced"],
        weight_decays=[1e-2],
        objective="accuracy",
        extend=False,
    )
    by_weighting = {c.class_weighting: c.scores for c in search.candidates}
    assert by_weighting["none"] == by_weighting["balanced"]
    assert search.chosen.class_weighting == "none"  # the objective's own weighting wins the tie


def test_a_balanced_accuracy_request_weighs_classes_unless_told_otherwise():
    linear, mlp = HeadKind("linear"), HeadKind("mlp")
    fair = TrainRequest(dataset_id="d", head_name="h", objective="balanced_accuracy")
    assert fair.class_weightings(linear) == ["balanced", "none"]  # searched, the objective's own first
    assert fair.model_copy(update={"kind": mlp}).class_weightings(mlp) == ["balanced"]
    fixed = TrainRequest(dataset_id="d", head_name="h", objective="balanced_accuracy", class_weighting="none")
    assert fixed.class_weightings(linear) == ["none"]
    assert TrainRequest(dataset_id="d", head_name="h", scaling="l2").scalings(linear) == ["l2"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "prototype", "scaling": "l2"}, "scaling applies to kind 'linear' or 'mlp' only"),
        ({"kind": "finetune", "scaling": "none"}, "scaling applies to kind"),
        ({"kind": "prototype", "class_weighting": "balanced"}, "class_weighting applies to kind"),
        ({"objective": "f1"}, "objective"),
        ({"scaling": "whiten"}, "scaling"),
    ],
)
def test_recipe_options_that_do_not_fit_the_request_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainRequest(dataset_id="d", head_name="h", **fields)


def test_a_head_keeps_its_scaling_so_whoever_loads_it_feeds_raw_features(digits):
    x, y = digits
    head = LinearHead(64, 10, "l2")
    head.set_scaling_stats(*scaling_stats(x, "l2"))
    weights = class_weights(y, 10, "balanced")
    assert weights is not None and weights.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(head.scale(x), scaled(x, "l2", *scaling_stats(x, "l2")))


def test_problems_too_many_to_hold_at_once_are_solved_in_turns_with_the_same_answers(digits, monkeypatch):
    x, y = digits
    rows, decays = uniform(len(y), 3), torch.tensor([1e-3, 1e-2, 1e-1])
    converged = {"dtype": torch.float64, "tolerance": 1e-12, "max_iterations": 5000}
    together = solve(x, y, 10, rows, decays, **converged)
    monkeypatch.setattr("adapters.logistic.SIDE_BY_SIDE_ELEMENTS", 1)  # one problem at a time
    in_turns = solve(x, y, 10, rows, decays, **converged)
    for p in range(3):  # the same optimum (summation order differs with the matmul's width)
        reached = [objective(x, y, s.weight[p], s.bias[p], float(decays[p])) for s in (together, in_turns)]
        assert reached[0] == pytest.approx(reached[1], rel=1e-5)
        assert torch.equal(together.logits(x)[p].argmax(1), in_turns.logits(x)[p].argmax(1))
