"""Label audit on cached features: images probably filed under the wrong label, and near-duplicates under two.

Why out-of-fold probabilities: a probe scores the images it was fitted on too
kindly (it has learnt their labels, wrong ones included). Stratified k folds
(adapters/crossval.py) give every image a probability from the linear head's
own model fitted on the other folds.

The flagging rule has one threshold per class, taken from the dataset's own
out-of-fold probabilities, nothing tuned: u_i, the mean probability of class i
over the images filed under the other labels (how much of "i" the probe sees in
a typical image that is not labelled i). An image labelled i is flagged when its
probability of i is below u_i: its own label is no more plausible to the probe
than it is for an image of another class. The suggestion is its most probable
other class. This mirrors Confident Learning's per-class threshold (Northcutt,
Jiang and Chuang, JAIR 2021: the mean of p_i over the images labelled i), on
the other side: Confident Learning's off-diagonal rule (flag when another class
j reaches its own threshold and i falls below its) misses the flips whose true
class the probe, trained on the noisy labels, is not confident about; on
benchmarks/accuracy_audit.py it caught 71% of the flipped labels at a precision
of 0.38, this rule 90% at 0.68. Suspects are ranked by the margin
p(suggested) - p(given), largest first.

Near-duplicates: cosine similarity of the pooled features at or above a
threshold (or the same image, by key) between images with different labels.
The search walks the similarity matrix in row blocks, so memory grows with N,
not N². Its work is bounded too: each block keeps only its best ``limit`` pairs
(a top-k over the block, never an index of every candidate), and the search
stops, marked truncated, once ``max_candidates`` pairs have met the threshold: a
threshold that low is not finding duplicates, and a tiny one would otherwise
make every cross-label pair of a large dataset a candidate. The count is then
the pairs found in the blocks examined, a lower bound.
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor

from adapters.crossval import CV_TOLERANCE, DEFAULT_FOLDS, fold_of, fold_row_weights, out_of_fold_logits
from adapters.errors import InvalidInput
from adapters.logistic import solve
from adapters.recipe import scaled, scaling_stats
from adapters.trainer import CancelCheck, raise_if_cancelled

PROBE_WEIGHT_DECAYS = (1.0, 0.1, 1e-2, 1e-3)  # the probe's path: its best neighbourhood is enough to rank labels

DEFAULT_DUPLICATE_SIMILARITY = 0.98
SIMILARITY_BLOCK_ROWS = 128  # rows of the similarity matrix held at once: 128 x N floats, and the pairs one block adds
MAX_DUPLICATE_CANDIDATES = 10_000  # pairs over the threshold a search finds before it stops, truncated


class OutOfFold(BaseModel, arbitrary_types_allowed=True):
    """Each example's class probabilities from a probe that did not see it."""

    probabilities: Tensor  # [N, C]
    folds: int
    weight_decay: float  # the probe's: the lowest out-of-fold log-loss, or the job's chosen recipe's


class Suspect(BaseModel):
    """An example whose given label is probably wrong, with the evidence."""

    index: int
    given: int
    suggested: int
    given_probability: float
    suggested_probability: float


class Duplicate(BaseModel):
    """Two examples with (nearly) the same features and different labels; ``first`` < ``second``."""

    first: int
    second: int
    similarity: float
    identical: bool  # the same image (same key), whatever the similarity


class LabelAudit(BaseModel):
    """What the audit found: every count, and the top of each ranking up to the limits asked for."""

    folds: int
    weight_decay: float
    thresholds: list[float]  # per class: its mean probability over the examples labelled otherwise
    suspect_count: int
    suspects: list[Suspect]  # ranked, at most max_suspects
    duplicate_count: int  # a lower bound when duplicates_truncated
    duplicates: list[Duplicate]  # identical first, then by similarity; at most max_duplicates
    duplicates_truncated: bool = False  # the search stopped at max_candidates pairs: the rest was not examined


def out_of_fold_probabilities(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    folds: int = DEFAULT_FOLDS,
    weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
    seed: int = 0,
    cancelled: CancelCheck | None = None,
) -> OutOfFold:
    """Out-of-fold softmax probabilities of a linear probe (standardised, balanced) on pooled features ``x`` [N, D].

    Every fold x weight decay is fitted side by side (adapters/logistic.py);
    the weight decay with the lowest out-of-fold log-loss wins: a proper scoring
    rule, because the flagging rule compares probabilities, not just argmaxes.
    Memory: the [folds x weight decays, N, C] logits. A class with fewer
    examples than ``folds`` lowers the folds to its size (at least 2).
    """
    x = x.float()
    y = y.to(torch.int64)
    counts = torch.bincount(y, minlength=num_classes)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise InvalidInput(
            f"the audit needs at least 2 examples of every class (one to hold out, one to fit); "
            f"the smallest class has {smallest}"
        )
    folds = min(folds, smallest)
    assignment = fold_of(y, folds, seed)
    z = scaled(x, "standardise", *scaling_stats(x, "standardise"))
    solution = solve(
        z,
        y,
        num_classes,
        fold_row_weights(y, assignment, folds, num_classes, ["balanced"] * len(weight_decays)),
        torch.tensor(list(weight_decays) * folds),
        tolerance=CV_TOLERANCE,
        cancelled=cancelled,
    )
    best: tuple[float, float, Tensor] | None = None  # (loss, -weight decay, log-probabilities): one [N, C] kept
    for j, weight_decay in enumerate(weight_decays):
        log_probs = F.log_softmax(out_of_fold_logits(z, solution, assignment, folds, j, len(weight_decays)), dim=1)
        loss = F.nll_loss(log_probs, y).item()
        if best is None or (loss, -weight_decay) < best[:2]:
            best = (loss, -weight_decay, log_probs)
    assert best is not None  # weight_decays is not empty
    return OutOfFold(probabilities=best[2].exp(), folds=folds, weight_decay=-best[1])


def class_thresholds(probabilities: Tensor, y: Tensor) -> Tensor:
    """Per class i, the mean probability of i over the examples labelled otherwise (inf if there are none)."""
    num_classes = probabilities.shape[1]
    totals = probabilities.double().sum(dim=0)
    own = torch.zeros(num_classes, dtype=torch.float64).index_add_(
        0, y, probabilities.gather(1, y[:, None]).double()[:, 0]
    )
    others = len(y) - torch.bincount(y, minlength=num_classes).double()
    return torch.where(others > 0, (totals - own) / others.clamp_min(1), torch.inf).float()


def label_suspects(probabilities: Tensor, y: Tensor, thresholds: Tensor) -> list[Suspect]:
    """Examples whose label's probability is below its class's threshold (module docstring), largest margin first."""
    rows = torch.arange(len(y))
    given = probabilities[rows, y]
    others = probabilities.clone()
    others[rows, y] = -1.0
    suggested_probability, suggested = others.max(dim=1)
    flagged = given < thresholds[y]
    order = torch.argsort(suggested_probability - given, descending=True, stable=True)
    return [
        Suspect(
            index=int(i),
            given=int(y[i]),
            suggested=int(suggested[i]),
            given_probability=float(given[i]),
            suggested_probability=float(suggested_probability[i]),
        )
        for i in order[flagged[order]]
    ]


def cross_label_duplicates(
    x: Tensor,
    y: Tensor,
    *,
    min_similarity: float,
    limit: int,
    keys: Sequence[str] | None = None,
    cancelled: CancelCheck | None = None,
    max_candidates: int = MAX_DUPLICATE_CANDIDATES,
) -> tuple[int, list[Duplicate], bool]:
    """Pairs with different labels whose cosine similarity is at least ``min_similarity`` or whose keys match.

    Returns the number of such pairs, the ``limit`` most similar (identical keys first), and whether the
    search stopped early: after the block in which the pairs found reached ``max_candidates`` (the count
    is then a lower bound and the ranking covers the blocks examined). Holds one block of
    ``SIMILARITY_BLOCK_ROWS`` rows of the similarity matrix at a time, and at most ``limit`` pairs of each.
    """
    if not 0.0 < min_similarity <= 1.0:
        raise InvalidInput(f"the duplicate similarity threshold must be in (0, 1], got {min_similarity}")
    if limit < 0:
        raise InvalidInput(f"the duplicate limit must be at least 0, got {limit}")
    if max_candidates < 1:
        raise InvalidInput(f"the candidate bound must be at least 1, got {max_candidates}")
    z = F.normalize(x.float(), dim=1)
    y = y.to(torch.int64)
    _, groups = np.unique(np.asarray(keys if keys is not None else range(len(y)), dtype=object), return_inverse=True)
    group = torch.from_numpy(groups.astype(np.int64))
    total = 0
    truncated = False
    kept = torch.empty(0, 3, dtype=torch.float64)  # (rank score, first, second)
    for start in range(0, len(y), SIMILARITY_BLOCK_ROWS):
        raise_if_cancelled(cancelled)
        stop = min(start + SIMILARITY_BLOCK_ROWS, len(y))
        similarity = z[start:stop] @ z[start:].T  # only pairs (i, j) with j > i are looked at
        same = group[start:stop, None] == group[None, start:]
        candidate = (similarity >= min_similarity) | same
        candidate &= y[start:stop, None] != y[None, start:]
        candidate &= torch.ones(candidate.shape, dtype=torch.bool).triu(1)  # column c: example start + c
        found = int(candidate.sum())
        total += found
        take = min(found, limit)
        if take:  # the block's best, by a top-k over its scores: never an index of every candidate
            score = torch.where(candidate, similarity + 2.0 * same.float(), -torch.inf)  # identical ones rank first
            best = torch.topk(score.flatten(), take)
            rows, cols = best.indices // score.shape[1], best.indices % score.shape[1]
            block = torch.stack([best.values.double(), (rows + start).double(), (cols + start).double()], dim=1)
            kept = torch.cat([kept, block])
            if len(kept) > limit:
                kept = kept[torch.topk(kept[:, 0], limit).indices]
        if total >= max_candidates and stop < len(y):
            truncated = True
            break
    kept = kept[torch.argsort(kept[:, 0], descending=True, stable=True)]
    duplicates = []
    for score, first_index, second_index in kept.tolist():
        identical = score > 1.5
        duplicates.append(
            Duplicate(
                first=int(first_index),
                second=int(second_index),
                similarity=min(1.0, score - 2.0 if identical else score),
                identical=identical,
            )
        )
    return total, duplicates, truncated


def audit_labels(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    keys: Sequence[str] | None = None,
    max_suspects: int = 50,
    max_duplicates: int = 50,
    duplicate_similarity: float = DEFAULT_DUPLICATE_SIMILARITY,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    cancelled: CancelCheck | None = None,
    max_candidates: int = MAX_DUPLICATE_CANDIDATES,
    out_of_fold: OutOfFold | None = None,
) -> LabelAudit:
    """The whole audit of pooled features ``x`` [N, D] with given labels ``y``; ``keys`` name identical images.

    ``out_of_fold``: probabilities the caller already has from models that did
    not see each example (a training job's k-fold search and its hold-out),
    instead of the audit's own probe.
    """
    if x.ndim != 2 or len(x) != len(y):
        raise InvalidInput(f"the audit needs pooled features [N, D] and N labels; got {tuple(x.shape)} and {len(y)}")
    if max_suspects < 0:
        raise InvalidInput(f"max_suspects must be at least 0, got {max_suspects}")
    if not 0.0 < duplicate_similarity <= 1.0:  # checked again by the search; here before the costly fits
        raise InvalidInput(f"the duplicate similarity threshold must be in (0, 1], got {duplicate_similarity}")
    if keys is not None and len(keys) != len(y):
        raise InvalidInput(f"got {len(keys)} image keys for {len(y)} examples")
    y = y.to(torch.int64)
    oof = out_of_fold or out_of_fold_probabilities(x, y, num_classes, folds=folds, seed=seed, cancelled=cancelled)
    thresholds = class_thresholds(oof.probabilities, y)
    suspects = label_suspects(oof.probabilities, y, thresholds)
    duplicate_count, duplicates, truncated = cross_label_duplicates(
        x,
        y,
        min_similarity=duplicate_similarity,
        limit=max_duplicates,
        keys=keys,
        cancelled=cancelled,
        max_candidates=max_candidates,
    )
    return LabelAudit(
        folds=oof.folds,
        weight_decay=oof.weight_decay,
        thresholds=[float(t) for t in thresholds],
        suspect_count=len(suspects),
        suspects=suspects[:max_suspects],
        duplicate_count=duplicate_count,
        duplicates=duplicates,
        duplicates_truncated=truncated,
    )


def audit_summary(audit: LabelAudit, classes: Sequence[str], top: int) -> dict:
    """The audit as a head version's metrics section: counts, and the ``top`` suspects and duplicates by name."""
    return {
        "folds": audit.folds,
        "suspect_count": audit.suspect_count,
        "suspects": [
            {
                "index": s.index,
                "label": classes[s.given],
                "suggested_label": classes[s.suggested],
                "label_score": s.given_probability,
                "suggested_score": s.suggested_probability,
            }
            for s in audit.suspects[:top]
        ],
        "duplicate_count": audit.duplicate_count,
        "duplicates": [d.model_dump() for d in audit.duplicates[:top]],
        "duplicates_truncated": audit.duplicates_truncated,
    }
