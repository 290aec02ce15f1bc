"""``kind: "auto"``: train several head kinds within a time budget and keep the best on the hold-out.

The candidates are the kinds whose record has an auto rule (adapters/kinds.py),
tried cheapest first by its rank (prototype, linear, mlp, then finetune when
asked for and the dataset is large enough), so a budget that runs out still
leaves the cheap ones tried; the first is always trained to the end, so there
is always a winner. A kind still training when the budget runs out is stopped
and reported as such. Ties on hold-out accuracy go to the cheaper kind: it
serves for less and has less to overfit.
"""

import time
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel

from adapters.kinds import KINDS, AutoRule, HeadKind

AUTO_KIND = "auto"  # request only: a version's kind is the kind that won
AutoKind = Literal["auto"]
DEFAULT_TIME_BUDGET_S = 60.0
MAX_TIME_BUDGET_S = 3600.0

Status = Literal["trained", "over_budget", "skipped"]


class KindCandidate(BaseModel):
    """One kind ``auto`` considered: how it did on the hold-out and what it cost."""

    kind: HeadKind
    status: Status
    holdout_accuracy: float | None = None  # None unless trained
    holdout_loss: float | None = None
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
    return f"the best on the hold-out of {listed}"


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
    """The trained candidate with the best hold-out accuracy; ties go to the earlier (cheaper) kind."""
    trained = [c for c in candidates if c.status == "trained" and c.holdout_accuracy is not None]
    best = max(trained, key=lambda c: (c.holdout_accuracy, -candidates.index(c)))
    scores = ", ".join(
        f"{c.kind.value} {c.holdout_accuracy:.3f}" if c.status == "trained" else f"{c.kind.value} {c.status}"
        for c in candidates
    )
    reason = f"{best.kind.value}: best hold-out accuracy ({scores})"
    return KindChoice(chosen=best.kind, reason=reason, time_budget_s=time_budget_s, candidates=candidates)


def kind_choice_metrics(choice: KindChoice) -> dict[str, float]:
    """Each trained kind's hold-out accuracy and seconds, as numeric metrics (job progress, version metrics)."""
    metrics = {}
    for candidate in choice.candidates:
        if candidate.holdout_accuracy is not None:
            metrics[f"auto_accuracy_{candidate.kind.value}"] = candidate.holdout_accuracy
        if candidate.status != "skipped":
            metrics[f"auto_seconds_{candidate.kind.value}"] = candidate.seconds
    return metrics
