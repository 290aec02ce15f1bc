"""Stratified k-fold cross-validation of a linear probe on cached features.

Why k folds: with a few hundred images one hold-out split is too noisy to
choose between backbones (on 300 textile images a 60-image hold-out prefers the
wrong one); k folds validate on every example once, and on cached features a
fold costs one L-BFGS fit, not a trunk pass.

The probe is the linear head's own model (standardise, L2-penalised logistic
regression). Each fold walks the weight-decay path from strong to weak
penalties, warm-starting every fit from the previous one; the score of a
backbone is its best weight decay's mean over the folds, and the spread is that
weight decay's standard deviation across folds.
"""

from collections.abc import Sequence

import numpy as np
import torch
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
    """Cross-validated accuracy of the linear probe on pooled features ``x`` [N, D].

    A class with fewer examples than ``folds`` lowers the number of folds to its
    size (at least 2), so small datasets still get an estimate.
    """
    x = x.float()
    y = y.to(torch.int64)
    counts = torch.bincount(y)
    folds = min(folds, int(counts[counts > 0].min()))
    path = sorted(weight_decays, reverse=True)  # strong to weak: each fit starts near its answer
    scores = np.zeros((len(path), folds))
    for f, val_idx in enumerate(stratified_folds(y.tolist(), folds, seed)):
        fit_mask = torch.ones(len(y), dtype=torch.bool)
        fit_mask[torch.from_numpy(val_idx)] = False
        mean, std = standardisation_stats(x[fit_mask])
        z_fit, z_val = (x[fit_mask] - mean) / std, (x[~fit_mask] - mean) / std
        y_fit, y_val = y[fit_mask], y[~fit_mask]
        weights = class_weights_for(y_fit, num_classes)
        torch.manual_seed(seed)
        linear = nn.Linear(x.shape[1], num_classes)
        for w, weight_decay in enumerate(path):
            hp = HyperParams(lr=1.0, weight_decay=weight_decay, epochs=PROBE_ROUNDS, batch_size=4096)
            fit_linear_layer(linear, z_fit, y_fit, hp, class_weights=weights, cancelled=cancelled)
            with torch.no_grad():
                scores[w, f] = accuracy(linear(z_val), y_val)
    best = int(np.argmax(scores.mean(axis=1)))
    return CrossValScore(
        mean=float(scores[best].mean()),
        std=float(scores[best].std()),
        folds=[float(s) for s in scores[best]],
        weight_decay=path[best],
    )


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
