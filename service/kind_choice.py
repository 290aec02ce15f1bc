"""``kind: "auto"``: score several head kinds by k-fold cross-validation within a time budget, keep one.

The candidates are the kinds whose record has an auto rule (adapters/kinds.py),
scored cheapest first by its rank (prototype, linear, mlp, then finetune when
asked for and the dataset is large enough), so a budget that runs out still
leaves the cheap ones scored; the first is always scored to the end, so there
is always a winner. A kind still being scored when the budget runs out is
stopped and reported as such. Every kind is scored on the same stratified folds
of the training split, by the request's objective; the one-standard-error rule
(adapters/crossval.py) takes the cheapest kind within one standard error of the
best: it serves for less and has less to overfit.
"""

import time
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel

from adapters.crossval import FoldScores, one_standard_error
from adapters.kinds import KINDS, AutoRule, HeadKind

AUTO_KIND = "auto"  # request only: a version's kind is the kind that won
AutoKind = Literal["auto"]
DEFAULT_TIME_BUDGET_S = 60.0
MAX_TIME_BUDGET_S = 3600.0

Status = Literal["trained", "over_budget", "skipped"]


class KindCandidate(BaseModel):
    """One kind ``auto`` considered: its k-fold scores (the objective per fold) and what they cost."""

    kind: HeadKind
    status: Status
    scores: FoldScores | None = None  # None unless trained on every fold
    seconds: float = 0.0
    note: str = ""


class KindChoice(BaseModel):
    """What ``auto`` chose, why, and every candidate's score: stored in the version's metrics."""

    chosen: HeadKind
    reason: str
    time_budget_s: float
    candidates: list[KindCandidate]


def auto_candidates(opt_in: bool) -> list[HeadKind]:
    """The kinds auto may train, cheapest first; those that need it asked (auto_finetune) only when ``opt_in``."""
    return [HeadKind(name) for name, _ in _auto_rules(opt_in)]


def kinds_to_try(opt_in: bool, train_counts: Sequence[int]) -> tuple[list[HeadKind], list[KindCandidate]]:
    """The kinds auto trains, cheapest first, and the ones it leaves out (a class too small for them) with why."""
    tried, left_out = [], []
    for name, rule in _auto_rules(opt_in):
        if min(train_counts) < rule.min_per_class:
            note = (
                f"{name} needs at least {rule.min_per_class} training examples of every class; "
                f"the smallest class has {min(train_counts)}"
            )
            left_out.append(KindCandidate(kind=HeadKind(name), status="skipped", note=note))
        else:
            tried.append(HeadKind(name))
    return tried, left_out


def auto_description() -> str:
    """What kind 'auto' does, in the API's descriptions: "the best on the hold-out of a, b and c"."""
    names = [name for name, _ in _auto_rules(opt_in=False)]
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return f"the best by k-fold cross-validation of {listed} (the cheapest within one standard error of the best)"


def _auto_rules(opt_in: bool) -> list[tuple[str, AutoRule]]:
    """Each kind auto may train with its rule, by rank."""
    rules = [
        (spec.name, spec.auto) for spec in KINDS.values() if spec.auto is not None and (opt_in or not spec.auto.opt_in)
    ]
    return sorted(rules, key=lambda named: named[1].rank)


class Budget:
    """The deadline of an auto run, as a cancel check that training and extraction already poll."""

    def __init__(self, seconds: float, cancelled: Callable[[], bool] | None) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.cancelled = cancelled or (lambda: False)

    def spent(self) -> bool:
        return time.monotonic() >= self.deadline

    def check(self) -> bool:
        """True when training should stop: the job was cancelled or the budget is spent."""
        return self.cancelled() or self.spent()


def choose_kind(candidates: list[KindCandidate], time_budget_s: float) -> KindChoice:
    """The cheapest scored kind within one standard error of the best (``candidates`` come cheapest first)."""
    scored = {c.kind.value: c.scores for c in candidates if c.status == "trained" and c.scores is not None}
    order = [c.kind.value for c in candidates if c.kind.value in scored]
    choice = one_standard_error(scored, order, what="cheapest")
    others = [
        f"{c.kind.value} {c.status}" + (f" ({c.note})" if c.note else "")
        for c in candidates
        if c.kind.value not in scored
    ]
    reason = f"{choice.chosen}: {choice.reason}" + (f"; not compared: {', '.join(others)}" if others else "")
    return KindChoice(chosen=HeadKind(choice.chosen), reason=reason, time_budget_s=time_budget_s, candidates=candidates)


def kind_choice_metrics(choice: KindChoice) -> dict[str, float]:
    """Each scored kind's k-fold mean and spread and seconds, as numeric metrics (job progress, version metrics)."""
    metrics = {}
    for candidate in choice.candidates:
        if candidate.scores is not None:
            metrics[f"auto_score_{candidate.kind.value}"] = candidate.scores.mean
            metrics[f"auto_std_{candidate.kind.value}"] = candidate.scores.std
        if candidate.status != "skipped":
            metrics[f"auto_seconds_{candidate.kind.value}"] = candidate.seconds
    return metrics
