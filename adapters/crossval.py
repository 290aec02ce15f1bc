"""Stratified k-fold cross-validation of a linear probe on cached features.

Why k folds: with a few hundred images one hold-out split is too noisy to
choose between backbones (on 300 textile images a 60-image hold-out prefers the
wrong one); k folds validate on every example once, and on cached features a
fold costs one L-BFGS fit, not a trunk pass.

The probe is the linear head's own model (standardise, L2-penalised logistic
regression). Each fold walks the weight-decay path from strong to weak
penalties, warm-starting every fit from the previous one; the score of a
backbone is its best weight decay's mean over the folds, and the spread is that
weight decay's standard deviation across folds. The linear head's own
hyper-parameter search (adapters/tuning.py) walks the same path on small
training sets, so its weight decay is chosen by k folds too.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from adapters.errors import InvalidInput
from adapters.heads import standardisation_stats
from adapters.trainer import CancelCheck, HyperParams, accuracy, class_weights_for, fit_linear_layer

DEFAULT_FOLDS = 5
# A coarser path than the linear search's (8 values): the choice between backbones
# needs each one's best neighbourhood, not its exact optimum.
PROBE_WEIGHT_DECAYS = (1.0, 0.1, 1e-2, 1e-3)
PROBE_ROUNDS = 5  # L-BFGS rounds per fit; warm starts converge in fewer


class CrossValScore(BaseModel):
    """One candidate's cross-validated linear-probe accuracy."""

    mean: float
    std: float  # across folds, at the best weight decay
    folds: list[float]  # per-fold accuracy at the best weight decay, fold order
    weight_decay: float
    loss: float | None = None  # mean validation cross-entropy over the folds; None when not finite


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


class Fold(NamedTuple):
    """One fold, standardised with its fitting part's statistics (the probe's own preprocessing)."""

    val_idx: Tensor  # positions of the validation examples
    z_fit: Tensor
    y_fit: Tensor
    z_val: Tensor
    y_val: Tensor


def standardised_folds(x: Tensor, y: Tensor, k: int, seed: int = 0) -> Iterator[Fold]:
    """Each of ``k`` stratified folds (``stratified_folds``) of float features ``x``, ready for a linear probe."""
    for val_idx in stratified_folds(y.tolist(), k, seed):
        val = torch.from_numpy(val_idx)
        fit_mask = torch.ones(len(y), dtype=torch.bool)
        fit_mask[val] = False
        mean, std = standardisation_stats(x[fit_mask])
        yield Fold(val, (x[fit_mask] - mean) / std, y[fit_mask], (x[val] - mean) / std, y[val])


def cross_validate_linear(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    folds: int = DEFAULT_FOLDS,
    weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
    seed: int = 0,
    cancelled: CancelCheck | None = None,
) -> CrossValScore:
    """Cross-validated accuracy of the linear probe on pooled features ``x`` [N, D], at its best weight decay.

    A class with fewer examples than ``folds`` lowers the number of folds to its
    size (at least 2), so small datasets still get an estimate.
    """
    y = y.to(torch.int64)
    path = [
        HyperParams(lr=1.0, weight_decay=weight_decay, epochs=PROBE_ROUNDS, batch_size=4096)
        for weight_decay in weight_decays
    ]
    weights = class_weights_for(y, num_classes)
    scores = cross_validate_path(
        x, y, num_classes, path, folds=folds, seed=seed, class_weights=weights, cancelled=cancelled
    )
    return scores[best_index(scores)]


def cross_validate_path(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    candidates: Sequence[HyperParams],
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    class_weights: Tensor | None = None,
    cancelled: CancelCheck | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[CrossValScore]:
    """Each candidate's k-fold score for the linear probe on ``x`` [N, D], in the candidates' order.

    Candidates that differ only in weight decay form one path, fitted from the
    strongest penalty to the weakest with warm starts; each path starts from
    the same seeded layer, so the scores depend only on the data and ``seed``.
    ``progress(done, total)`` is called after each fold. A candidate whose
    validation loss is not finite in some fold gets ``loss=None``.
    """
    x = x.float()
    y = y.to(torch.int64)
    counts = torch.bincount(y)
    folds = min(folds, int(counts[counts > 0].min()))
    paths: dict[str, list[int]] = {}
    for index, hp in enumerate(candidates):  # strong to weak: each fit starts near its answer
        paths.setdefault(hp.model_copy(update={"weight_decay": 0.0}).model_dump_json(), []).append(index)
    accuracies = np.zeros((len(candidates), folds))
    losses = np.zeros((len(candidates), folds))
    for f, (_, z_fit, y_fit, z_val, y_val) in enumerate(standardised_folds(x, y, folds, seed)):
        for members in paths.values():
            torch.manual_seed(seed)
            linear = nn.Linear(x.shape[1], num_classes)
            for index in sorted(members, key=lambda i: -candidates[i].weight_decay):
                hp = candidates[index]
                fit_linear_layer(linear, z_fit, y_fit, hp, class_weights=class_weights, cancelled=cancelled)
                with torch.no_grad():
                    logits = linear(z_val)
                accuracies[index, f] = accuracy(logits, y_val)
                losses[index, f] = F.cross_entropy(logits, y_val).item()
                if not math.isfinite(losses[index, f]):  # a diverged fit is no start for the next one
                    torch.manual_seed(seed)
                    linear = nn.Linear(x.shape[1], num_classes)
        if progress is not None:
            progress(f + 1, folds)
    return [
        CrossValScore(
            mean=float(accuracies[i].mean()),
            std=float(accuracies[i].std()),
            folds=[float(a) for a in accuracies[i]],
            weight_decay=hp.weight_decay,
            loss=float(losses[i].mean()) if np.isfinite(losses[i]).all() else None,
        )
        for i, hp in enumerate(candidates)
    ]


def best_index(scores: Sequence[CrossValScore]) -> int:
    """The highest mean accuracy, ties to the lower mean loss, then to the earlier; a diverged score never wins."""
    finite = [i for i, score in enumerate(scores) if score.loss is not None]
    if not finite:
        raise InvalidInput(
            f"all {len(scores)} cross-validated trials diverged (non-finite validation loss); "
            "try a smaller lr or weight_decay"
        )
    return max(finite, key=lambda i: (scores[i].mean, -(scores[i].loss or 0.0), -i))


class Choice(BaseModel):
    """Which candidate won, and why, in words a person can check against the scores."""

    chosen: str
    reason: str
    scores: dict[str, CrossValScore]
    costs: dict[str, float]


def choose(scores: dict[str, CrossValScore], costs: dict[str, float]) -> Choice:
    """The best mean cross-validated accuracy wins, unless a cheaper candidate ties with it.

    A tie: the leader's per-fold advantage over the cheaper candidate (same
    folds, so the differences are paired) is no larger than its standard error.
    Among tying candidates the cheapest wins.
    """
    if not scores:
        raise InvalidInput("no candidates to choose from")
    leader = max(scores, key=lambda name: (scores[name].mean, -costs[name]))
    lead = scores[leader]

    def ties_with_leader(name: str) -> bool:
        gap, error = _paired_gap(lead, scores[name])
        return gap <= error

    ties = [name for name in scores if costs[name] < costs[leader] and ties_with_leader(name)]
    if len(scores) == 1:
        return Choice(
            chosen=leader, reason=f"{leader} is the only candidate ({_shown(lead)})", scores=scores, costs=costs
        )
    if ties:
        cheapest = min(ties, key=lambda name: costs[name])
        gap, error = _paired_gap(lead, scores[cheapest])
        reason = (
            f"tie: {leader} ({_shown(lead)}) leads {cheapest} ({_shown(scores[cheapest])}) by "
            f"{100 * gap:.1f} points, within the standard error of the per-fold differences "
            f"({100 * error:.1f}); the cheaper {cheapest} wins ({costs[cheapest]:g} against "
            f"{costs[leader]:g} GFLOPs)"
        )
        return Choice(chosen=cheapest, reason=reason, scores=scores, costs=costs)
    runner_up = max((name for name in scores if name != leader), key=lambda name: scores[name].mean)
    gap, error = _paired_gap(lead, scores[runner_up])
    reason = (
        f"{leader} ({_shown(lead)}) beats {runner_up} ({_shown(scores[runner_up])}) by {100 * gap:.1f} "
        f"points, more than the standard error of the per-fold differences ({100 * error:.1f})"
        if costs[runner_up] < costs[leader]
        else f"{leader} ({_shown(lead)}) beats {runner_up} ({_shown(scores[runner_up])}) by {100 * gap:.1f} "
        f"points and is no more expensive"
    )
    return Choice(chosen=leader, reason=reason, scores=scores, costs=costs)


def _paired_gap(a: CrossValScore, b: CrossValScore) -> tuple[float, float]:
    """Mean of a's per-fold advantage over b, and its standard error."""
    diffs = np.asarray(a.folds) - np.asarray(b.folds)
    return float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs)))


def _shown(score: CrossValScore) -> str:
    return f"{score.mean:.3f} ± {score.std:.3f} over {len(score.folds)} folds"
