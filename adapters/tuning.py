"""Hyperparameter search: train one head per configuration, keep the best on validation.

Two ways to validate. By default each trial trains on the training split and
is scored on the hold-out; the winning head is returned as trained (no refit on
train + validation), so the validation score reported for it is the one it
really earned. A kind whose record can cross-validate (linear) instead
chooses, on a small training split, by stratified k-fold cross-validation on
the training split alone (adapters/crossval.py), then fits the winner on the
whole training split: with a few hundred images one small hold-out picks a
noisy weight decay, while on cached features k folds cost only a few more
L-BFGS fits. The hold-out then chooses nothing, so the caller's score of the
returned head on it stays honest.

Every kind-specific step (how a trial trains, what it reads, whether it has a
width to search) is a field of the kind's record (adapters/kinds.py).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from adapters.crossval import DEFAULT_FOLDS, best_index
from adapters.errors import InvalidInput
from adapters.kinds import HeadConfig, HeadKindSpec, build_head, get_kind
from adapters.search_space import SearchSpace
from adapters.trainer import (
    CancelCheck,
    HyperParams,
    Progress,
    ProgressEvent,
    accuracy,
    check_class_weights,
    check_examples,
    predict_logits,
    raise_if_cancelled,
    training_mode,
)

# Searches choose by k folds up to this many training examples. Above it the
# hold-out (a fifth of the data by default) has 2,500+ images, precise to about a
# point, and k folds would cost k times the search for no better choice.
KFOLD_MAX_EXAMPLES = 10_000


class Trial(BaseModel):
    hp: HyperParams
    val_accuracy: float
    # Mean cross-entropy on validation, without class weights; None when the trial
    # diverged (a non-finite loss), so results stay plain JSON numbers.
    val_loss: float | None
    # Per-fold accuracy when the trial was scored by k-fold cross-validation on the
    # training split (val_accuracy and val_loss are then the folds' means); None
    # when it was scored on the hold-out.
    cv_folds: list[float] | None = None


@dataclass(frozen=True)
class TuneResult:
    head: nn.Module  # the best trial's head, trained on the training split, in eval mode
    config: HeadConfig  # the best head's config (for mlp, `hidden` is the winning width)
    best: HyperParams
    trials: list[Trial]


def tune(
    config: HeadConfig,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    space: SearchSpace,
    base: HyperParams | None = None,
    tail_factory: Callable[[], nn.Module] | None = None,
    class_weights: Tensor | None = None,
    progress: Progress | None = None,
    cancelled: CancelCheck | None = None,
    seed: int = 0,
) -> TuneResult:
    """Train one head per search point on train, score each on val, return the best.

    `base` supplies everything the space does not vary (epochs, batch size...);
    without it, the kind's defaults. A kind that copies the tail needs
    `tail_factory` to get a fresh copy of the tail per trial. Small training
    splits of a kind that can cross-validate are scored by k folds instead (see
    `kfold_applies`); `x_val` and `y_val` are then only checked.
    Ties on validation accuracy go to the lower validation loss. A trial that
    diverges (non-finite validation loss) is kept in `trials` with no loss and
    never wins; if every trial diverges, that is an InvalidInput.
    """
    spec = get_kind(config.kind)
    if spec.copies_tail and tail_factory is None:
        raise InvalidInput(f"tuning a {spec.name} head needs a tail_factory that copies the backbone's tail")
    if not spec.hidden_layer and space.hidden is not None:
        raise InvalidInput(f"`hidden` can only be searched for heads with a hidden layer, not {spec.name}")
    candidates = _candidates(space, base or spec.hyperparams)

    with training_mode():
        feature_dims = spec.feature_dims
        x_train, y_train = check_examples(x_train, y_train, config.num_classes, feature_dims, "training")
        x_val, y_val = check_examples(
            x_val.to(x_train.device), y_val.to(x_train.device), config.num_classes, feature_dims, "validation"
        )
        class_weights = check_class_weights(class_weights, config.num_classes, x_train.device)
        if kfold_applies(config, y_train):
            return _tune_by_kfold(
                spec,
                config,
                x_train,
                y_train,
                candidates,
                class_weights,
                progress=progress,
                cancelled=cancelled,
                seed=seed,
            )

        best: tuple[tuple[float, float], Trial, nn.Module, HeadConfig] | None = None
        trials: list[Trial] = []
        for index, hp in enumerate(candidates):
            raise_if_cancelled(cancelled)
            trial_progress = _trial_progress(progress, index, len(candidates))
            trial_config = config
            if spec.hidden_layer and hp.hidden is not None:
                trial_config = HeadConfig.model_validate(config.model_dump() | {"hidden": hp.hidden})

            torch.manual_seed(seed)
            head = build_head(trial_config, tail_factory() if tail_factory is not None else None)
            spec.fit(
                head,
                x_train,
                y_train,
                hp,
                x_val=x_val,
                y_val=y_val,
                class_weights=class_weights,
                progress=trial_progress,
                cancelled=cancelled,
                seed=seed,
            )

            logits = predict_logits(head, x_val)
            val_loss = F.cross_entropy(logits, y_val).item()
            diverged = not math.isfinite(val_loss)
            trial = Trial(hp=hp, val_accuracy=accuracy(logits, y_val), val_loss=None if diverged else val_loss)
            trials.append(trial)
            rank = (trial.val_accuracy, -val_loss)  # higher accuracy, then lower loss
            if not diverged and (best is None or rank > best[0]):
                best = (rank, trial, head, trial_config)
            if progress is not None:
                progress(
                    ProgressEvent(
                        phase="search",
                        fraction=(index + 1) / len(candidates),
                        message=f"trial {index + 1}/{len(candidates)} " + ("diverged" if diverged else "done"),
                        metrics={"val_accuracy": trial.val_accuracy} | ({} if diverged else {"val_loss": val_loss}),
                    )
                )

    if best is None:
        raise InvalidInput(
            f"all {len(trials)} trials diverged (non-finite validation loss); try a smaller lr or weight_decay"
        )
    _, best_trial, best_head, best_config = best
    return TuneResult(head=best_head.eval(), config=best_config, best=best_trial.hp, trials=trials)


def kfold_applies(config: HeadConfig, y_train: Tensor) -> bool:
    """Whether the search validates by k folds of the training split rather than on the hold-out.

    Only for kinds whose record can cross-validate (linear: a fold costs one
    L-BFGS fit on cached features; an mlp or finetune trial costs a full
    training run), on at most `KFOLD_MAX_EXAMPLES` training examples, with at
    least 2 of every class so each can be validated.
    """
    counts = torch.bincount(y_train.to("cpu", torch.int64))
    return (
        get_kind(config.kind).cross_validate is not None
        and len(y_train) <= KFOLD_MAX_EXAMPLES
        and int(counts[counts > 0].min()) >= 2
    )


def _tune_by_kfold(
    spec: HeadKindSpec[Any],
    config: HeadConfig,
    x_train: Tensor,
    y_train: Tensor,
    candidates: list[HyperParams],
    class_weights: Tensor | None,
    *,
    progress: Progress | None,
    cancelled: CancelCheck | None,
    seed: int,
) -> TuneResult:
    """Score every candidate by stratified k folds of the training split, then fit the best on all of it."""
    assert spec.cross_validate is not None  # kfold_applies
    counts = torch.bincount(y_train)
    folds = min(DEFAULT_FOLDS, int(counts[counts > 0].min()))  # as many as the smallest class allows
    fits = folds + 1  # progress: the folds, then the final fit

    def fold_done(done: int, total: int) -> None:
        if progress is not None:
            message = f"cross-validation fold {done}/{total}"
            progress(ProgressEvent(phase="search", fraction=done / fits, message=message))

    def final_fit(event: ProgressEvent) -> None:
        if progress is not None:
            update = {
                "phase": "search",
                "fraction": (folds + event.fraction) / fits,
                "message": f"final fit: {event.message}",
            }
            progress(event.model_copy(update=update))

    scores = spec.cross_validate(
        x_train,
        y_train,
        config.num_classes,
        candidates,
        folds=folds,
        seed=seed,
        class_weights=class_weights,
        cancelled=cancelled,
        progress=fold_done,
    )
    trials = [
        Trial(hp=hp, val_accuracy=score.mean, val_loss=score.loss, cv_folds=score.folds)
        for hp, score in zip(candidates, scores, strict=True)
    ]
    best = trials[best_index(scores)]
    torch.manual_seed(seed)
    head = build_head(config)
    spec.fit(
        head, x_train, y_train, best.hp, class_weights=class_weights, progress=final_fit, cancelled=cancelled, seed=seed
    )
    if progress is not None:
        message = (
            f"weight_decay={best.hp.weight_decay:g} chosen by {folds}-fold cross-validation "
            f"(accuracy {best.val_accuracy:.3f}), fitted on the whole training split"
        )
        metrics = {"cv_accuracy": best.val_accuracy}
        progress(ProgressEvent(phase="search", fraction=1.0, message=message, metrics=metrics))
    return TuneResult(head=head.eval(), config=config, best=best.hp, trials=trials)


def _candidates(space: SearchSpace, base: HyperParams) -> list[HyperParams]:
    """The hyperparameters of each trial: `base` with the searched values swapped in."""
    candidates = []
    for lr, weight_decay, hidden in space.points():
        overrides: dict[str, float | int] = {"lr": lr, "weight_decay": weight_decay}
        if hidden is not None:
            overrides["hidden"] = hidden
        candidates.append(HyperParams.model_validate(base.model_dump() | overrides))
    return candidates


def _trial_progress(progress: Progress | None, index: int, count: int) -> Progress | None:
    """Rescale one trial's fit progress into its slice of the whole search."""
    if progress is None:
        return None

    def report(event: ProgressEvent) -> None:
        progress(
            ProgressEvent(
                phase="search",
                fraction=(index + event.fraction) / count,
                message=f"trial {index + 1}/{count}: {event.message}",
                metrics=event.metrics,
            )
        )

    return report
