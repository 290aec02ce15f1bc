"""Choosing by stratified k-fold cross-validation on cached features, with the one-standard-error rule.

Why k folds: with a few hundred images one hold-out split is too noisy to choose
a recipe, a kind or a backbone (on 300 textile images a 60-image hold-out
prefers the wrong backbone); k folds validate on every example once, and on
cached features a fold costs one solver run, not a trunk pass.

Why one standard error: candidates whose scores differ by less than the noise
of the folds are not really different, so the rule takes the simplest (or
cheapest) candidate whose per-fold deficit to the best is within one standard
error of the paired differences (same folds, so the differences are paired).

`search_linear` is the linear recipe's search: every scaling x class weighting
x weight decay (SearchSpace), all folds of a scaling solved side by side
(adapters/logistic.py). The weight-decay grid extends itself while a recipe's
best value sits on its edge, then is refined by half a decade around the best
of the recipes still in contention. It keeps the chosen candidate's
out-of-fold logits, which the label audit reads instead of fitting its own folds.

Why a search has a key: it is a pure function of its features, labels and
options, and its report (every candidate's fold scores) is kept with the head
version it chose. A retrain on the same features with the same options (the key,
a digest of all of them, matches) rereads that evidence and solves only the
chosen recipe's folds again, for their out-of-fold logits.
"""

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from adapters.errors import InvalidInput
from adapters.logistic import PrincipalAxes, Solution, solve
from adapters.recipe import class_weights, get_objective, scaled, scaling_stats, score

DEFAULT_FOLDS = 5
CV_TOLERANCE = 1e-4  # the folds only rank candidates: a looser fit than the final head's ranks them the same
MIN_WEIGHT_DECAY, MAX_WEIGHT_DECAY = 1e-7, 10.0  # HyperParams' bounds (0 excluded: an unpenalised fit may not exist)
MAX_EXTENSIONS = 4  # grid steps added beyond an edge, per recipe
SEARCH_FORMAT = 2  # part of every search's key: raise it when a change to the search changes its verdicts


def stratified_folds(labels: Sequence[int], k: int, seed: int = 0) -> list[np.ndarray]:
    """Validation indices of ``k`` folds that keep class proportions; every index in exactly one fold.

    Each class is shuffled (fixed seed) and dealt round-robin, starting where
    the previous class stopped, so fold sizes differ by at most one.
    """
    label_array = np.asarray(labels)
    counts = np.bincount(label_array)
    if k < 2:
        raise InvalidInput(
            f"cross-validation needs at least 2 folds, got {k}: add at least 2 training examples of every class"
        )
    if counts[counts > 0].min() < k:
        raise InvalidInput(
            f"{k}-fold cross-validation needs at least {k} examples of every class; "
            f"the smallest class has {counts[counts > 0].min()}"
        )
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for label in np.unique(label_array):
        members = np.flatnonzero(label_array == label)
        rng.shuffle(members)
        for i, index in enumerate(members):
            folds[(offset + i) % k].append(int(index))
        offset += len(members)
    return [np.sort(np.asarray(fold, dtype=np.int64)) for fold in folds]


def fold_count(y: Tensor, folds: int = DEFAULT_FOLDS) -> int:
    """As many folds as asked, but no more than the smallest class has examples."""
    counts = torch.bincount(y.to("cpu", torch.int64))
    return min(folds, int(counts[counts > 0].min()))


def fold_of(y: Tensor, folds: int, seed: int) -> Tensor:
    """Each example's fold [N] (`stratified_folds`)."""
    assignment = torch.empty(len(y), dtype=torch.int64)
    for f, members in enumerate(stratified_folds(y.tolist(), folds, seed)):
        assignment[torch.from_numpy(members)] = f
    return assignment


class FoldScores(BaseModel):
    """One candidate's cross-validated scores: the objective per fold, and both figures' means."""

    folds: list[float]  # the objective, per fold
    mean: float
    std: float  # across folds
    accuracy: float  # mean over folds
    balanced_accuracy: float

    @classmethod
    def of(cls, objective_folds: Sequence[float], accuracy: float, balanced_accuracy: float) -> "FoldScores":
        values = np.asarray(objective_folds, dtype=np.float64)
        return cls(
            folds=[float(v) for v in values],
            mean=float(values.mean()),
            std=float(values.std()),
            accuracy=accuracy,
            balanced_accuracy=balanced_accuracy,
        )

    def shown(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f} over {len(self.folds)} folds"


class Choice(BaseModel):
    """Which candidate the one-standard-error rule chose among named ones, and why, in words a person can check."""

    chosen: str
    best: str  # the highest mean
    reason: str
    scores: dict[str, FoldScores]


def one_standard_error(scores: dict[str, FoldScores], order: Sequence[str], what: str = "simplest") -> Choice:
    """The first of ``order`` (simplest or cheapest first) whose mean is within one standard error of the best's.

    The standard error is that of the per-fold differences to the best
    (paired: the same folds). Ties on the mean go to the earlier in ``order``.
    """
    if not scores:
        raise InvalidInput("no candidates to choose from")
    rank = {name: i for i, name in enumerate(order)}
    best = max(scores, key=lambda name: (scores[name].mean, -rank[name]))
    chosen = next(name for name in order if name in scores and _paired_gap(scores[best], scores[name]) <= 0)
    if len(scores) == 1:
        reason = f"{best} is the only candidate ({scores[best].shown()})"
    elif chosen == best:
        comparative = _COMPARATIVES.get(what, what)
        ahead = [name for name in order[: rank[best]] if name in scores]
        reason = f"{best} has the best mean ({scores[best].shown()})"
        if ahead:
            closest = max(ahead, key=lambda n: scores[n].mean)
            gap, error = _gap_and_error(scores[best], scores[closest])
            reason += (
                f"; no {comparative} candidate is within one standard error of it (the closest, {closest}, "
                f"{scores[closest].shown()}, trails by {100 * gap:.1f} points, standard error {100 * error:.1f})"
            )
        else:
            reason += f" and is the {what} candidate"
    else:
        gap, error = _gap_and_error(scores[best], scores[chosen])
        reason = (
            f"{chosen} ({scores[chosen].shown()}) trails the best, {best} ({scores[best].shown()}), by "
            f"{100 * gap:.1f} points, within one standard error of the per-fold differences ({100 * error:.1f}); "
            f"it is the {what} such candidate"
        )
    return Choice(chosen=chosen, best=best, reason=reason, scores=scores)


_COMPARATIVES = {"simplest": "simpler", "cheapest": "cheaper"}


def best_mean(scores: dict[str, FoldScores], order: Sequence[str], what: str = "cheapest") -> Choice:
    """The candidate with the best mean; a tie goes to the earlier in ``order`` (cheapest first).

    For candidates that differ in cost but not in how much they can fit (two
    backbones under the same head): there the one-standard-error rule trades
    accuracy for cost, about a point of test accuracy on the textile splits of
    benchmarks/accuracy.py, where the better backbone's lead is often within
    the noise of 240 images' folds yet holds on 1,700 unseen ones.
    """
    if not scores:
        raise InvalidInput("no candidates to choose from")
    rank = {name: i for i, name in enumerate(order)}
    best = max(scores, key=lambda name: (scores[name].mean, -rank[name]))
    if len(scores) == 1:
        reason = f"{best} is the only candidate ({scores[best].shown()})"
        return Choice(chosen=best, best=best, reason=reason, scores=scores)
    trailing = []
    for name in sorted(scores, key=lambda n: -scores[n].mean):
        if name != best:
            gap, error = _gap_and_error(scores[best], scores[name])
            trailing.append(
                f"{name} ({scores[name].shown()}) trails by {100 * gap:.1f} points, standard error {100 * error:.1f}"
            )
    reason = (
        f"{best} has the best mean ({scores[best].shown()}); {'; '.join(trailing)}; the best mean wins, the "
        f"{what} on a tie"
    )
    return Choice(chosen=best, best=best, reason=reason, scores=scores)


def _gap_and_error(best: FoldScores, other: FoldScores) -> tuple[float, float]:
    """Mean of best's per-fold advantage over other, and its standard error."""
    diffs = np.asarray(best.folds) - np.asarray(other.folds)
    error = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
    return float(diffs.mean()), error


def _paired_gap(best: FoldScores, other: FoldScores) -> float:
    """How far other falls short of best beyond one standard error (<= 0: within it)."""
    gap, error = _gap_and_error(best, other)
    return gap - error - 1e-12


class RecipeCandidate(BaseModel):
    """One linear recipe the search scored: its choices and its fold scores."""

    scaling: str
    class_weighting: str
    weight_decay: float
    scores: FoldScores

    @property
    def name(self) -> str:
        return f"{self.scaling}/{self.class_weighting}/weight_decay={self.weight_decay:.4g}"


class RecipeSearch(BaseModel):
    """The linear search's evidence and verdict, as stored in a version's metrics (out-of-fold logits aside)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    key: str  # `search_key` of its features, labels and options
    objective: str
    folds: int
    candidates: list[RecipeCandidate]  # in the order they were scored
    chosen: RecipeCandidate
    rule: str
    out_of_fold_logits: Tensor  # [N, C]: the chosen candidate's, each example's from the fold that left it out
    fold_average: Solution  # the chosen candidate's fold fits averaged: where its fit on every row starts
    axes: PrincipalAxes  # of the chosen scaling's features (float64): the final fit on the same rows reuses them
    reread: bool = False  # its candidates' scores are a kept report's (`reread`), not searched again

    def report(self) -> dict:
        """JSON for the version's metrics: every candidate's mean and spread, the choice and the rule."""
        return {
            "key": self.key,
            "objective": self.objective,
            "folds": self.folds,
            "chosen": self.chosen.model_dump(mode="json"),
            "rule": self.rule,
            "evidence": "reread: a kept search with the same key (the same features, labels and options)"
            if self.reread
            else "searched",
            "candidates": [
                {"scaling": c.scaling, "class_weighting": c.class_weighting, "weight_decay": c.weight_decay}
                | c.scores.model_dump()
                for c in self.candidates
            ],
        }


Progress = Callable[[str], None]
# A stored search's report (`RecipeSearch.report`) with this key, if one was kept; None if none.
Evidence = Callable[[str], dict | None]


def search_key(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    scalings: Sequence[str],
    class_weightings: Sequence[str],
    weight_decays: Sequence[float],
    objective: str,
    folds: int,
    seed: int,
    extend: bool,
) -> str:
    """A digest of everything `search_linear` reads: the same key, the same verdict."""
    options = {
        "format": SEARCH_FORMAT,
        "shape": list(x.shape),
        "classes": num_classes,
        "scalings": list(scalings),
        "class_weightings": list(class_weightings),
        "weight_decays": sorted(set(weight_decays)),
        "objective": objective,
        "folds": folds,
        "seed": seed,
        "extend": extend,
    }
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    digest.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def search_linear(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    scalings: Sequence[str],
    class_weightings: Sequence[str],
    weight_decays: Sequence[float],
    objective: str,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    extend: bool = True,
    evidence: Evidence | None = None,
    cancelled: Callable[[], bool] | None = None,
    progress: Progress | None = None,
) -> RecipeSearch:
    """Score every scaling x class weighting x weight decay by stratified k folds of x [N, D], y [N]; choose one.

    ``scalings`` and ``class_weightings`` are in order of simplicity; the
    objective's own weighting counts as the simplest. With ``extend``, a
    recipe's grid grows past an edge that holds its best weight decay (by the
    grid's own step, within HyperParams' bounds) and is refined by half a step
    around the best of every recipe within one standard error of the best.
    ``evidence`` looks up a kept report by this search's key: found, its
    verdict is reread (`reread`) instead of searched again.
    """
    x = x.float()
    y = y.to(torch.int64)
    k = fold_count(y, folds)
    key = search_key(
        x,
        y,
        num_classes,
        scalings=scalings,
        class_weightings=class_weightings,
        weight_decays=weight_decays,
        objective=objective,
        folds=k,
        seed=seed,
        extend=extend,
    )
    kept = evidence(key) if evidence is not None else None
    if kept is not None:
        return reread(kept, x, y, num_classes, seed=seed, cancelled=cancelled)
    assignment = fold_of(y, k, seed)
    preferred = get_objective(objective).class_weighting
    weightings = sorted(class_weightings, key=lambda w: w != preferred)  # stable: the objective's first
    scored: dict[tuple[str, str, float], _Scored] = {}
    features: dict[str, tuple[Tensor, PrincipalAxes]] = {}  # each scaling's features and their float64 axes
    # A weighting that weighs every fold's examples the same as the first weighting poses the same problems:
    # solved once, scored under both names (balanced weights on classes of equal size are all 1).
    same_as_first = {w: _same_rows(y, assignment, k, num_classes, weightings[0], w) for w in weightings}

    # The weighting each one's problems are solved under: the first, where they are the same problems.
    solved_as = {w: weightings[0] if same_as_first[w] else w for w in weightings}

    def run(scaling: str, pairs: list[tuple[str, float]]) -> None:
        wanted = [(w, d) for w, d in pairs if (scaling, w, d) not in scored]
        solved = list(dict.fromkeys((solved_as[w], d) for w, d in wanted if (scaling, solved_as[w], d) not in scored))
        if solved:
            if scaling not in features:
                features[scaling] = _scaled_features(x, scaling)
            z, axes = features[scaling]
            fits = _fold_fits(z, axes, y, assignment, k, num_classes, objective, solved, cancelled)
            for (weighting, decay), fit in zip(solved, fits, strict=True):
                scored[(scaling, weighting, decay)] = fit
            if progress is not None:
                progress(f"{scaling}: {len(solved) * k} fits over {k} folds")
        for weighting, decay in wanted:
            scored[(scaling, weighting, decay)] = scored[(scaling, solved_as[weighting], decay)]

    def best_decay(scaling: str, weighting: str) -> tuple[list[float], float]:
        """The weight decays tried for a recipe, in order, and the one with the best mean."""
        tried = sorted(d for (s, w, d) in scored if s == scaling and w == weighting)
        return tried, max(tried, key=lambda d: scored[(scaling, weighting, d)].scores.mean)

    grid = sorted(set(weight_decays))
    for scaling in scalings:
        run(scaling, [(w, d) for w in weightings for d in grid])

    if extend:
        step = _grid_step(grid)
        for scaling in scalings:
            for _ in range(MAX_EXTENSIONS):
                additions = []
                for weighting in weightings:
                    tried, best = best_decay(scaling, weighting)
                    if best == tried[0] and best / step >= MIN_WEIGHT_DECAY:
                        additions.append((weighting, _rounded(best / step)))
                    elif best == tried[-1] and best * step <= MAX_WEIGHT_DECAY:
                        additions.append((weighting, _rounded(best * step)))
                if not additions:
                    break
                run(scaling, additions)
        leader, keys = _choice(scored, scalings, weightings)
        lead_scores = scored[keys[leader.best]].scores
        for scaling in scalings:
            refinements = []
            for weighting in weightings:
                _, best = best_decay(scaling, weighting)
                if _paired_gap(lead_scores, scored[(scaling, weighting, best)].scores) <= 0:
                    half = math.sqrt(step)
                    refinements += [(weighting, _rounded(best / half)), (weighting, _rounded(best * half))]
            run(scaling, [(w, d) for w, d in refinements if MIN_WEIGHT_DECAY <= d <= MAX_WEIGHT_DECAY])

    choice, keys = _choice(scored, scalings, weightings)
    candidates = [
        RecipeCandidate(scaling=s, class_weighting=w, weight_decay=d, scores=scores)
        for (s, w, d), (scores, _, _) in scored.items()
    ]
    chosen = next(c for c in candidates if c.name == choice.chosen)
    return RecipeSearch(
        key=key,
        objective=objective,
        folds=k,
        candidates=candidates,
        chosen=chosen,
        rule=choice.reason,
        out_of_fold_logits=scored[keys[choice.chosen]].logits,
        fold_average=scored[keys[choice.chosen]].average,
        axes=features[chosen.scaling][1],
    )


def reread(
    report: dict, x: Tensor, y: Tensor, num_classes: int, *, seed: int, cancelled: Callable[[], bool] | None = None
) -> RecipeSearch:
    """The search a kept ``report`` describes, on the features and labels it was run on (its key says so).

    Candidates, verdict and rule are the report's; the chosen recipe's folds are
    solved again, since its out-of-fold logits are not kept (N x C numbers the
    calibration and the label audit read).
    """
    candidates = [
        RecipeCandidate(
            scaling=c["scaling"],
            class_weighting=c["class_weighting"],
            weight_decay=c["weight_decay"],
            scores=FoldScores.model_validate({name: c[name] for name in FoldScores.model_fields}),
        )
        for c in report["candidates"]
    ]
    wanted = report["chosen"]
    chosen = next(
        (
            c
            for c in candidates
            if (c.scaling, c.class_weighting) == (wanted["scaling"], wanted["class_weighting"])
            and math.isclose(c.weight_decay, wanted["weight_decay"], rel_tol=1e-9)
        ),
        None,
    )
    if chosen is None:
        raise InvalidInput(f"the kept search {report['key'][:12]} chose a recipe it did not score: {wanted}")
    k = int(report["folds"])
    assignment = fold_of(y, k, seed)
    z, axes = _scaled_features(x, chosen.scaling)
    (fit,) = _fold_fits(
        z,
        axes,
        y,
        assignment,
        k,
        num_classes,
        report["objective"],
        [(chosen.class_weighting, chosen.weight_decay)],
        cancelled,
    )
    return RecipeSearch(
        key=report["key"],
        objective=report["objective"],
        folds=k,
        candidates=candidates,
        chosen=chosen,
        rule=report["rule"],
        out_of_fold_logits=fit.logits,
        fold_average=fit.average,
        axes=axes,
        reread=True,
    )


def _scaled_features(x: Tensor, scaling: str) -> tuple[Tensor, PrincipalAxes]:
    """x as a head of ``scaling`` reads it (statistics of all of x: unsupervised), and its float64 axes."""
    z = scaled(x, scaling, *scaling_stats(x, scaling))
    return z, PrincipalAxes.of(z.double())


def _fold_fits(
    z: Tensor,
    axes: PrincipalAxes,
    y: Tensor,
    assignment: Tensor,
    k: int,
    num_classes: int,
    objective: str,
    recipes: Sequence[tuple[str, float]],
    cancelled: Callable[[], bool] | None,
) -> list["_Scored"]:
    """Each (class weighting, weight decay) of ``recipes`` fit on every fold of z, all side by side: each one's fold
    scores, out-of-fold logits and fold average."""
    solution = solve(
        z,
        y,
        num_classes,
        fold_row_weights(y, assignment, k, num_classes, [weighting for weighting, _ in recipes]),
        torch.tensor([decay for _ in range(k) for _, decay in recipes]),
        axes=axes,
        tolerance=CV_TOLERANCE,
        cancelled=cancelled,
    )
    fits = []
    for j in range(len(recipes)):
        logits = out_of_fold_logits(z, solution, assignment, k, j, len(recipes))
        scores = fold_scores(logits.argmax(1), y, assignment, k, num_classes, objective)
        fits.append(_Scored(scores, logits, fold_average(solution, k, j, len(recipes))))
    return fits


def fold_scores(
    predicted: Tensor, y: Tensor, assignment: Tensor, k: int, num_classes: int, objective: str
) -> FoldScores:
    """The objective on each fold's validation examples, and both figures' means over the folds."""

    def per_fold(name: str) -> list[float]:
        return [score(name, predicted[assignment == f], y[assignment == f], num_classes) for f in range(k)]

    return FoldScores.of(
        per_fold(objective),
        accuracy=float(np.mean(per_fold("accuracy"))),
        balanced_accuracy=float(np.mean(per_fold("balanced_accuracy"))),
    )


def fold_row_weights(y: Tensor, assignment: Tensor, k: int, num_classes: int, weightings: Sequence[str]) -> Tensor:
    """Row weights [k x W, N] of one problem per fold and weighting, stacked fold by fold: each fold's fitting
    rows, weighted by the weighting on their own labels, summing to 1."""
    rows = []
    for f in range(k):
        fit = assignment != f
        for weighting in weightings:
            weights = class_weights(y[fit], num_classes, weighting)
            row = fit.float() if weights is None else fit.float() * weights[y]
            rows.append(row / row.sum())
    return torch.stack(rows)


def out_of_fold_logits(z: Tensor, solution: Solution, assignment: Tensor, k: int, j: int, per_fold: int) -> Tensor:
    """Logits [N, C] of the j-th of ``per_fold`` problems stacked fold by fold (`fold_row_weights`): each
    example's from the fold that left it out."""
    logits = torch.empty(len(z), solution.bias.shape[1])
    for f in range(k):
        val = assignment == f
        problem = f * per_fold + j
        logits[val] = z[val].float() @ solution.weight[problem].T + solution.bias[problem]
    return logits


def fold_average(solution: Solution, k: int, j: int, per_fold: int) -> Solution:
    """The j-th of ``per_fold`` problems stacked fold by fold (`fold_row_weights`), its k fits averaged: near the
    same recipe's fit on every row, each fold having seen (k - 1) / k of them."""
    problems = [f * per_fold + j for f in range(k)]
    return Solution(
        weight=solution.weight[problems].mean(0, keepdim=True),
        bias=solution.bias[problems].mean(0, keepdim=True),
        iterations=torch.zeros(1, dtype=torch.int64),
    )


class _Scored(NamedTuple):
    """One recipe's fold scores, out-of-fold logits [N, C] and fold average, as the search keeps them."""

    scores: FoldScores
    logits: Tensor
    average: Solution


def _same_rows(y: Tensor, assignment: Tensor, k: int, num_classes: int, first: str, other: str) -> bool:
    """Whether ``other`` weighs every fold's fitting examples as ``first`` does (up to a common factor)."""
    for f in range(k):
        fit = y[assignment != f]
        a, b = class_weights(fit, num_classes, first), class_weights(fit, num_classes, other)
        ones = torch.ones(num_classes)
        a, b = (ones if a is None else a)[fit], (ones if b is None else b)[fit]
        if not torch.allclose(a / a.sum(), b / b.sum(), rtol=1e-5, atol=1e-9):
            return False
    return True


def _rounded(weight_decay: float) -> float:
    """A grid value as people write it (6 significant digits), so that stepping down and up meets the same value."""
    return float(f"{weight_decay:.6g}")


def _grid_step(grid: Sequence[float]) -> float:
    """The ratio between neighbours of a weight-decay grid (a decade when it has one value)."""
    if len(grid) < 2:
        return 10.0
    return float(np.exp(np.mean(np.diff(np.log(grid)))))


def _choice(
    scored: dict[tuple[str, str, float], "_Scored"], scalings: Sequence[str], weightings: Sequence[str]
) -> tuple[Choice, dict[str, tuple[str, str, float]]]:
    """The one-standard-error rule over the recipes' configurations (the objective's weighting, then the simpler
    scaling, is simpler), each at its own best weight decay (the stronger on a tie), and each candidate's key by name.

    The weight decay is tuned within a configuration rather than judged by the
    rule: preferring the strongest penalty within one standard error
    over-regularises, and cost about half a point of test accuracy on
    EfficientNet-Lite2's textile features against a plain cross-validated
    logistic regression (benchmarks/accuracy.py).
    """
    keys = {
        RecipeCandidate(scaling=s, class_weighting=w, weight_decay=d, scores=v.scores).name: (s, w, d)
        for (s, w, d), v in scored.items()
    }
    tuned: dict[tuple[str, str], str] = {}  # each configuration's candidate at its best weight decay
    for name in sorted(keys, key=lambda n: -keys[n][2]):  # strongest penalty first: it keeps a tie
        configuration = keys[name][:2]
        if (
            configuration not in tuned
            or scored[keys[name]].scores.mean > scored[keys[tuned[configuration]]].scores.mean
        ):
            tuned[configuration] = name
    order = [tuned[c] for c in sorted(tuned, key=lambda c: (weightings.index(c[1]), scalings.index(c[0])))]
    return one_standard_error({n: scored[keys[n]].scores for n in order}, order), keys
