"""Training one head on pre-computed backbone features: the gradient-trained kinds' fits.

Each head kind gets the optimiser that suits it (its record in adapters/kinds.py
names its fit):

* linear (`fit_linear`): L-BFGS to convergence on the convex, L2-penalised
  cross-entropy of the scaled features (adapters/logistic.py: the problem
  scikit-learn's LogisticRegression solves, so the result matches it);
* mlp and finetune (`fit_mlp`, `fit_finetune`): mini-batch AdamW with a
  one-cycle schedule, keeping the weights of the epoch with the best validation
  accuracy.

Bad hyperparameters fail when the `HyperParams` model is built, with a pydantic
ValidationError that names the field; the service maps it to InvalidArgument.
"""

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from adapters.errors import InvalidInput, TrainingCancelled
from adapters.heads import FinetuneHead, LinearHead, MLPHead
from adapters.logistic import FINAL_GRADIENT_TOLERANCE, FINAL_TOLERANCE, PrincipalAxes, Solution, solve
from adapters.recipe import scaling_stats

# A linear fit's L-BFGS steps per `epochs` (HyperParams): its bound on the work, never reached in practice.
LBFGS_STEPS_PER_EPOCH = 50
# Rows per forward pass when only predicting (validation, scoring).
PREDICT_BATCH = 1024


class HyperParams(BaseModel):
    """Training knobs. Out-of-range, NaN or infinite values fail validation.

    A linear head trains full-batch to convergence: `epochs` x 50 bounds its
    L-BFGS steps, and lr/batch_size/patience/label_smoothing are unused. `hidden` is a search dimension for mlp heads:
    the trainer takes the head as built, so it only matters to `tune`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    lr: float = Field(gt=0.0, le=10.0)
    weight_decay: float = Field(ge=0.0, le=10.0)
    epochs: int = Field(ge=1, le=500)
    batch_size: int = Field(ge=1, le=4096)
    hidden: int | None = Field(default=None, ge=1, le=8192)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    patience: int = Field(default=10, ge=1, le=500)


class ProgressEvent(BaseModel):
    phase: str  # "fit" for one training run, "search" across tuning trials
    fraction: float = Field(ge=0.0, le=1.0)
    message: str
    metrics: dict[str, float] = {}


Progress = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


class FitResult(BaseModel):
    epochs_run: int
    best_val_accuracy: float | None  # None when no validation data was given
    train_loss: float  # mean cross-entropy on the training set, without the L2 term


@contextmanager
def training_mode() -> Iterator[None]:
    """Autograd on, even when the caller is inside no_grad or inference_mode."""
    with torch.inference_mode(False), torch.set_grad_enabled(True):
        yield


def as_training_tensor(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A normal tensor (float32 unless told otherwise) that autograd can use.

    Features extracted under inference_mode are "inference tensors" that
    autograd refuses to save for backward; those are cloned. Call inside
    `training_mode()`.
    """
    x = x.detach().to(dtype)
    return x.clone() if x.is_inference() else x


def predict_logits(head: nn.Module, x: Tensor, batch_size: int = PREDICT_BATCH) -> Tensor:
    """Logits in eval mode, in chunks so large feature maps fit in memory."""
    head.eval()
    with torch.no_grad():
        return torch.cat([head(x[start : start + batch_size]) for start in range(0, x.shape[0], batch_size)])


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(dim=1) == y).float().mean().item()


def fit_linear(
    head: LinearHead,
    x_train: Tensor,
    y_train: Tensor,
    hp: HyperParams,
    *,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    class_weights: Tensor | None = None,
    progress: Progress | None = None,
    cancelled: CancelCheck | None = None,
    seed: int = 0,
    axes: PrincipalAxes | None = None,
    start: LinearHead | None = None,
) -> FitResult:
    """A linear head on pooled features [N, D]: its scaling's statistics from x_train, then logistic regression.

    Minimises the (class-weighted) mean cross-entropy + weight_decay * ||W||^2 / 2
    (bias not penalised) to convergence: scikit-learn's objective at
    C = 1 / (weight_decay * n_train). Like every fit here, it trains the head in
    place on the device x_train lives on and leaves it in eval mode. It raises
    TrainingCancelled as soon as `cancelled()` is true, checked at every step
    (every mini-batch for AdamW), so a stop takes effect well within an epoch.
    ``axes``: `PrincipalAxes` of exactly these scaled features, from a search on
    the same rows, spare the fit its eigendecomposition. ``start``: a linear head
    of the same scaling and shape to start from (its function, re-expressed in
    this head's statistics). Converged means a gradient norm below
    FINAL_GRADIENT_TOLERANCE, so a start already at the optimum costs one
    gradient and no eigendecomposition.
    """
    with _fitting(head, x_train.device, seed):
        examples = _checked(head.num_classes, 2, x_train, y_train, x_val, y_val, class_weights)
        head.set_scaling_stats(*scaling_stats(examples.x_train, head.scaling))
        z = head.scale(examples.x_train).detach().cpu()
        y = examples.y_train.cpu()
        row = torch.ones(len(y)) if examples.class_weights is None else examples.class_weights.cpu()[y]
        solution = solve(
            z,
            y,
            head.num_classes,
            (row / row.sum())[None],
            torch.tensor([hp.weight_decay]),
            start=None if start is None else _start_in(head, start),
            axes=axes,
            dtype=torch.float64,
            tolerance=FINAL_TOLERANCE,
            gradient_tolerance=FINAL_GRADIENT_TOLERANCE,
            max_iterations=hp.epochs * LBFGS_STEPS_PER_EPOCH,
            cancelled=cancelled,
        )
        with torch.no_grad():
            head.linear.weight.copy_(solution.weight[0])
            head.linear.bias.copy_(solution.bias[0])
    val_accuracy = None
    if examples.x_val is not None and examples.y_val is not None:
        val_accuracy = accuracy(predict_logits(head, examples.x_val), examples.y_val)
    train_loss = F.cross_entropy(predict_logits(head, examples.x_train), examples.y_train).item()
    _report(progress, "fit", 1.0, "done", **_summary(train_loss, val_accuracy))
    return FitResult(epochs_run=int(solution.iterations[0]), best_val_accuracy=val_accuracy, train_loss=train_loss)


def _start_in(head: LinearHead, start: LinearHead) -> Solution:
    """``start``'s weights for the scaled features ``head`` reads: the same logits from the same raw features."""
    if start.scaling != head.scaling or start.linear.weight.shape != head.linear.weight.shape:
        raise InvalidInput(
            f"a {start.scaling} head of shape {list(start.linear.weight.shape)} cannot start a {head.scaling} head "
            f"of shape {list(head.linear.weight.shape)}"
        )
    with torch.no_grad():  # on the CPU, where the solver works
        weight = start.linear.weight.cpu() / start.std.cpu()  # on the unscaled features (rows at unit length for l2)
        bias = start.linear.bias.cpu() - weight @ start.mean.cpu()
        return Solution(
            weight=(weight * head.std.cpu())[None],
            bias=(bias + weight @ head.mean.cpu())[None],
            iterations=torch.zeros(1, dtype=torch.int64),
        )


def fit_mlp(
    head: MLPHead,
    x_train: Tensor,
    y_train: Tensor,
    hp: HyperParams,
    *,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    class_weights: Tensor | None = None,
    progress: Progress | None = None,
    cancelled: CancelCheck | None = None,
    seed: int = 0,
) -> FitResult:
    """An mlp head on pooled features [N, D]: its scaling's statistics from x_train, then AdamW (see `fit_linear`)."""
    with _fitting(head, x_train.device, seed):
        examples = _checked(head.num_classes, 2, x_train, y_train, x_val, y_val, class_weights)
        head.set_scaling_stats(*scaling_stats(examples.x_train, head.scaling))
        return _fit_minibatch(head, examples, hp, progress, cancelled, seed)


def fit_finetune(
    head: FinetuneHead,
    x_train: Tensor,
    y_train: Tensor,
    hp: HyperParams,
    *,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    class_weights: Tensor | None = None,
    progress: Progress | None = None,
    cancelled: CancelCheck | None = None,
    seed: int = 0,
) -> FitResult:
    """A finetune head on the feature maps [N, C, H, W] at its split point, by AdamW (see `fit_linear`)."""
    with _fitting(head, x_train.device, seed):
        examples = _checked(head.num_classes, 4, x_train, y_train, x_val, y_val, class_weights)
        return _fit_minibatch(head, examples, hp, progress, cancelled, seed)


class _Examples(NamedTuple):
    """A fit's examples, checked and ready for autograd."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor | None
    y_val: Tensor | None
    class_weights: Tensor | None


@contextmanager
def _fitting(head: nn.Module, device: torch.device, seed: int) -> Iterator[None]:
    """What every fit runs in: a fixed seed, autograd on, the head in float32 on ``device``; eval mode after."""
    torch.manual_seed(seed)
    with training_mode():
        head.to(device=device, dtype=torch.float32)
        yield
    head.eval()


def _checked(
    num_classes: int,
    feature_dims: int,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor | None,
    y_val: Tensor | None,
    class_weights: Tensor | None,
) -> _Examples:
    """A fit's arguments checked (`check_examples`), on x_train's device; call inside `training_mode()`."""
    device = x_train.device
    x_train, y_train = check_examples(x_train, y_train, num_classes, feature_dims, "training")
    if (x_val is None) != (y_val is None):
        raise InvalidInput("give both x_val and y_val, or neither")
    if x_val is not None and y_val is not None:
        x_val, y_val = check_examples(x_val.to(device), y_val.to(device), num_classes, feature_dims, "validation")
    return _Examples(x_train, y_train, x_val, y_val, check_class_weights(class_weights, num_classes, device))


def _fit_minibatch(
    head: nn.Module,
    examples: _Examples,
    hp: HyperParams,
    progress: Progress | None,
    cancelled: CancelCheck | None,
    seed: int,
) -> FitResult:
    """AdamW + one-cycle; with validation data, early-stop and keep the best epoch."""
    x_train, y_train, x_val, y_val, class_weights = examples
    parameters = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / hp.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=hp.epochs * steps_per_epoch)
    shuffler = torch.Generator().manual_seed(seed)

    best_accuracy: float | None = None
    best_state: dict[str, Tensor] | None = None
    epochs_without_gain = 0
    epoch = 0
    for epoch in range(1, hp.epochs + 1):
        head.train()
        order = torch.randperm(n, generator=shuffler).to(x_train.device)
        loss_sum = torch.zeros((), device=x_train.device)  # summed on device: no sync per step
        for start in range(0, n, hp.batch_size):
            raise_if_cancelled(cancelled)
            batch = order[start : start + hp.batch_size]
            loss = F.cross_entropy(
                head(x_train[batch]), y_train[batch], weight=class_weights, label_smoothing=hp.label_smoothing
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * batch.shape[0]
        metrics = {"train_loss": loss_sum.item() / n}

        if x_val is not None and y_val is not None:
            val_accuracy = accuracy(predict_logits(head, x_val), y_val)
            metrics["val_accuracy"] = val_accuracy
            if best_accuracy is None or val_accuracy > best_accuracy:
                best_accuracy, best_state, epochs_without_gain = val_accuracy, copy.deepcopy(head.state_dict()), 0
            else:
                epochs_without_gain += 1
        _report(progress, "fit", epoch / hp.epochs, f"epoch {epoch}/{hp.epochs}", **metrics)
        if epochs_without_gain >= hp.patience:
            break

    if best_state is not None:
        head.load_state_dict(best_state)
    train_loss = F.cross_entropy(predict_logits(head, x_train), y_train).item()
    _report(progress, "fit", 1.0, "done", **_summary(train_loss, best_accuracy))
    return FitResult(epochs_run=epoch, best_val_accuracy=best_accuracy, train_loss=train_loss)


def check_examples(x: Tensor, y: Tensor, num_classes: int, feature_dims: int, role: str) -> tuple[Tensor, Tensor]:
    """Shapes, label range and finiteness, checked before any optimiser sees them.

    Returns training-ready copies (see `as_training_tensor`); call inside `training_mode()`.
    """
    if x.dim() != feature_dims:
        raise InvalidInput(f"{role} features must have {feature_dims} dimensions, got shape {list(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.shape[0] == 0:
        raise InvalidInput(
            f"{role} labels must be a non-empty 1-D tensor with one label per example, "
            f"got {list(y.shape)} for {x.shape[0]} examples"
        )
    if y.min() < 0 or y.max() >= num_classes:
        raise InvalidInput(f"{role} labels must lie in [0, {num_classes - 1}]")
    x = as_training_tensor(x)
    if not torch.isfinite(x).all():
        raise InvalidInput(f"{role} features contain NaN or infinite values")
    return x, as_training_tensor(y, torch.int64)


def check_class_weights(class_weights: Tensor | None, num_classes: int, device: torch.device) -> Tensor | None:
    if class_weights is None:
        return None
    if class_weights.shape != (num_classes,) or not torch.isfinite(class_weights).all() or (class_weights < 0).any():
        raise InvalidInput(f"class_weights must be {num_classes} finite, non-negative numbers")
    return as_training_tensor(class_weights.to(device))


def raise_if_cancelled(cancelled: CancelCheck | None) -> None:
    if cancelled is not None and cancelled():
        raise TrainingCancelled("training was cancelled")


def _summary(train_loss: float, val_accuracy: float | None) -> dict[str, float]:
    summary = {"train_loss": train_loss}
    if val_accuracy is not None:
        summary["val_accuracy"] = val_accuracy
    return summary


def _report(progress: Progress | None, phase: str, fraction: float, message: str, **metrics: float) -> None:
    if progress is not None:
        progress(ProgressEvent(phase=phase, fraction=min(fraction, 1.0), message=message, metrics=metrics))
