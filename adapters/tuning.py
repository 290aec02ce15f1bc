"""Hyperparameter search: train one head per configuration, keep the best on validation.

Two ways to validate. By default each trial trains on the training split and
is scored on the hold-out; the winning head is returned as trained (no refit on
train + validation), so the validation score reported for it is the one it
really earned. A kind whose record cross-validates (linear) instead chooses its
whole recipe (scaling x class weighting x weight decay) by stratified k-fold
cross-validation on the training split alone with the one-standard-error rule
(adapters/crossval.py), then fits the winner on the whole training split: with
a few hundred images one small hold-out picks a noisy recipe, while on cached
features k folds cost only a few solver runs. The hold-out then chooses
nothing, so the caller's score of the returned head on it stays honest.

Every kind-specific step (how a trial trains, what it reads, whether it has a
width to search) is a field of the kind's record (adapters/kinds.py).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from adapters.crossval import Evidence, RecipeSearch, search_linear
from adapters.errors import InvalidInput
from adapters.heads import LinearHead
from adapters.kinds import HeadConfig, build_head, get_kind
from adapters.logistic import PrincipalAxes
from adapters.recipe import Scaling, class_weights, scaling_stats
from adapters.search_space import SearchSpace
from adapters.trainer import (
    CancelCheck,
    HyperParams,
    Progress,
    ProgressEvent,
    accuracy,
    check_examples,
    fit_linear,
    predict_logits,
    raise_if_cancelled,
    training_mode,
)


class Trial(BaseModel):
    hp: HyperParams
    val_accuracy: float
    # Mean cross-entropy on validation, without class weights; None when the trial
    # diverged (a non-finite loss), so results stay plain JSON numbers.
    val_loss: float | None
    # The objective per fold when the trial was scored by k-fold cross-validation on
    # the training split (val_accuracy is then their mean, val_loss None); None when
    # it was scored on the hold-out.
    cv_folds: list[float] | None = None
    scaling: str | None = None  # the recipe it was trained with, for kinds that have one
    class_weighting: str | None = None


@dataclass(frozen=True)
class TuneResult:
    head: nn.Module  # the best trial's head, trained on the training split, in eval mode
    config: HeadConfig  # the best head's config (for mlp, `hidden` is the winning width)
    best: HyperParams
    trials: list[Trial]
    class_weighting: str | None  # the winner's (None: the kind weighs no loss)
    search: RecipeSearch | None = None  # the k-fold evidence, when the kind cross-validates


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
    objective: str = "accuracy",
    scalings: Sequence[str] = (),
    class_weightings: Sequence[str] = (),
    known: RecipeSearch | None = None,
    evidence: Evidence | None = None,
    progress: Progress | None = None,
    cancelled: CancelCheck | None = None,
    seed: int = 0,
) -> TuneResult:
    """Train one head per search point on train, score each on val, return the best.

    ``known`` is a k-fold search already run on these training examples with
    these options and seed (backbone or kind 'auto' ran it to compare): its
    verdict is fitted instead of searching again; ``evidence`` looks up a kept
    search by its key (`search_linear`).
    ``scalings`` and ``class_weightings`` are the recipes to try, simplest first
    (adapters/recipe.py); a kind that does not cross-validate trains with the
    config's scaling and the first weighting (none given: no class weights).

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
        if kfold_applies(config, y_train):
            return _tune_by_kfold(
                config,
                x_train,
                y_train,
                space,
                base or spec.hyperparams,
                objective,
                scalings or [config.scaling.value if config.scaling else "standardise"],
                class_weightings or ["none"],
                known=known,
                evidence=evidence,
                progress=progress,
                cancelled=cancelled,
                seed=seed,
            )
        weighting = class_weightings[0] if class_weightings else None
        weights = class_weights(y_train, config.num_classes, weighting) if weighting else None
        if weights is not None:
            weights = weights.to(x_train.device)

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
                class_weights=weights,
                progress=trial_progress,
                cancelled=cancelled,
                seed=seed,
            )

            logits = predict_logits(head, x_val)
            val_loss = F.cross_entropy(logits, y_val).item()
            diverged = not math.isfinite(val_loss)
            trial = Trial(
                hp=hp,
                val_accuracy=accuracy(logits, y_val),
                val_loss=None if diverged else val_loss,
                scaling=trial_config.scaling.value if trial_config.scaling else None,
                class_weighting=weighting,
            )
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
    return TuneResult(
        head=best_head.eval(), config=best_config, best=best_trial.hp, trials=trials, class_weighting=weighting
    )


def kfold_applies(config: HeadConfig, y_train: Tensor) -> bool:
    """Whether the search validates by k folds of the training split rather than on the hold-out.

    Only for kinds whose record cross-validates (linear: a fold costs one
    solver run on cached features; an mlp or finetune trial costs a full
    training run), with at least 2 of every class so each can be validated.
    """
    counts = torch.bincount(y_train.to("cpu", torch.int64))
    return get_kind(config.kind).cross_validate and int(counts[counts > 0].min()) >= 2


def _tune_by_kfold(
    config: HeadConfig,
    x_train: Tensor,
    y_train: Tensor,
    space: SearchSpace,
    base: HyperParams,
    objective: str,
    scalings: Sequence[str],
    class_weightings: Sequence[str],
    *,
    known: RecipeSearch | None,
    evidence: Evidence | None,
    progress: Progress | None,
    cancelled: CancelCheck | None,
    seed: int,
) -> TuneResult:
    """Choose the recipe by stratified k folds of the training split (`search_linear`), then fit it on all of it."""

    def searched(message: str) -> None:
        if progress is not None:
            progress(ProgressEvent(phase="search", fraction=0.5, message=f"cross-validation: {message}"))

    search = known or search_linear(
        x_train.cpu(),
        y_train.cpu(),
        config.num_classes,
        scalings=scalings,
        class_weightings=class_weightings,
        weight_decays=space.weight_decay,
        objective=objective,
        seed=seed,
        evidence=evidence,
        cancelled=cancelled,
        progress=searched,
    )
    chosen = search.chosen
    best = base.model_copy(update={"weight_decay": chosen.weight_decay})
    chosen_config = config.model_copy(update={"scaling": Scaling(chosen.scaling)})
    head = fit_recipe(
        chosen_config,
        x_train,
        y_train,
        best,
        chosen.class_weighting,
        axes=search.axes,
        start=_fold_average_head(chosen_config, x_train, search),
        cancelled=cancelled,
        seed=seed,
    )
    trials = [
        Trial(
            hp=base.model_copy(update={"weight_decay": c.weight_decay}),
            val_accuracy=c.scores.mean,
            val_loss=None,
            cv_folds=c.scores.folds,
            scaling=c.scaling,
            class_weighting=c.class_weighting,
        )
        for c in search.candidates
    ]
    if progress is not None:
        message = f"{chosen.name} chosen by {search.folds}-fold cross-validation: {search.rule}"
        progress(ProgressEvent(phase="search", fraction=1.0, message=message, metrics={"cv_score": chosen.scores.mean}))
    return TuneResult(
        head=head.eval(),
        config=chosen_config,
        best=best,
        trials=trials,
        class_weighting=chosen.class_weighting,
        search=search,
    )


def fit_recipe(
    config: HeadConfig,
    x: Tensor,
    y: Tensor,
    hp: HyperParams,
    class_weighting: str,
    *,
    axes: PrincipalAxes | None = None,
    start: LinearHead | None = None,
    cancelled: CancelCheck | None = None,
    seed: int = 0,
) -> LinearHead:
    """A searched linear recipe (scaling in ``config``, ``hp.weight_decay``, ``class_weighting``) fit on x, y.

    ``axes``: the search's principal axes of the same rows (`fit_linear`), so the
    fit on the training split skips its eigendecomposition; ``start``: a head to
    start from (`fit_linear`). Both the fit on the training split and the refit
    on every example come here.
    """
    torch.manual_seed(seed)
    head = build_head(config)
    if not isinstance(head, LinearHead):
        raise InvalidInput(f"a searched recipe is a linear head's, not a {config.kind.value} head's")
    weights = class_weights(y, config.num_classes, class_weighting)
    fit_linear(
        head,
        x,
        y,
        hp,
        class_weights=None if weights is None else weights.to(x.device),
        cancelled=cancelled,
        seed=seed,
        axes=axes,
        start=start,
    )
    return head.eval()


def _fold_average_head(config: HeadConfig, x_train: Tensor, search: RecipeSearch) -> LinearHead:
    """The chosen recipe's fold fits averaged, as a head on the training split's scaling: where its fit on the
    whole training split starts (about a quarter fewer steps than from zero)."""
    head = build_head(config)
    if not isinstance(head, LinearHead):
        raise InvalidInput(f"a searched recipe is a linear head's, not a {config.kind.value} head's")
    head.set_scaling_stats(*scaling_stats(x_train.cpu(), head.scaling))
    with torch.no_grad():
        head.linear.weight.copy_(search.fold_average.weight[0])
        head.linear.bias.copy_(search.fold_average.bias[0])
    return head


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
