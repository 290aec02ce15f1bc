"""``kind: "auto"``: train several head kinds within a time budget and keep the best on the hold-out.

The kinds are tried cheapest first (prototype, linear, mlp, then finetune when
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

from adapters.heads import HeadKind

AUTO_KIND = "auto"
AutoKind = Literal["auto"]
# Cheapest first: the order kinds are tried in, and the tie-break.
AUTO_KINDS = (HeadKind.PROTOTYPE, HeadKind.LINEAR, HeadKind.MLP)
DEFAULT_TIME_BUDGET_S = 60.0
MAX_TIME_BUDGET_S = 3600.0
# Finetuning a few blocks from fewer examples than this per class overfits more
# than it gains over a head on frozen features; auto leaves it out below it.
AUTO_FINETUNE_MIN_PER_CLASS = 20

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


def kinds_to_try(finetune: bool, train_counts: Sequence[int]) -> tuple[list[HeadKind], list[KindCandidate]]:
    """The kinds auto trains, cheapest first, and the ones it leaves out with why."""
    if not finetune:
        return list(AUTO_KINDS), []
    if min(train_counts) < AUTO_FINETUNE_MIN_PER_CLASS:
        note = (
            f"finetune needs at least {AUTO_FINETUNE_MIN_PER_CLASS} training examples of every class; "
            f"the smallest class has {min(train_counts)}"
        )
        return list(AUTO_KINDS), [KindCandidate(kind=HeadKind.FINETUNE, status="skipped", note=note)]
    return [*AUTO_KINDS, HeadKind.FINETUNE], []


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
