"""Fitting a prototype head: class means of centred, L2-normalised features (SimpleShot).

Everything is closed form except the temperature, a 1-D convex problem: it
trains in milliseconds on cached features and works from one example per class.

* The centre is the mean of the class means, not of the examples, so a large
  class does not pull it towards itself.
* The temperature minimises the cross-entropy of leave-one-out scores: each
  training example is scored against its own class mean computed without it
  (scored against a mean it is part of, every example looks too close to its
  class, and the fitted softmax would be over-confident). Classes with one
  example have no leave-one-out mean and add no terms; when no class has two,
  the temperature stays at ``DEFAULT_TEMPERATURE``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.errors import InvalidInput
from adapters.golden import golden_section_minimum
from adapters.heads import PrototypeHead, normalised
from adapters.trainer import CancelCheck, HyperParams, Progress, raise_if_cancelled

# Bounds of the temperature search. Cosines lie in [-1, 1], so 1 keeps the
# softmax nearly flat and 100 makes it nearly one-hot.
MIN_TEMPERATURE = 1.0
MAX_TEMPERATURE = 100.0
# Used when nothing can be scored leave-one-out (every class has one example):
# a 0.2 cosine margin then means e^2 ≈ 7x the odds.
DEFAULT_TEMPERATURE = 10.0


@torch.no_grad()
def fit_prototype(
    head: PrototypeHead,
    x: Tensor,
    y: Tensor,
    hp: HyperParams | None = None,
    *,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    class_weights: Tensor | None = None,
    progress: Progress | None = None,
    cancelled: CancelCheck | None = None,
    seed: int = 0,
) -> None:
    """Set ``head``'s centre, prototypes and temperature from features x [N, D] and labels y [N], on x's device.

    Every class needs at least one example: a class with none has no mean to
    compare with, so the head could never predict it. The arguments after
    ``y`` make this the prototype kind's fit (adapters/kinds.py); a closed form
    has no hyper-parameters, validation, class weights or randomness to use.
    """
    raise_if_cancelled(cancelled)
    num_classes = head.num_classes
    head.to(x.device)
    x = x.to(torch.float32)
    y = y.to(x.device, torch.int64)
    counts = torch.bincount(y, minlength=num_classes)
    if (missing := (counts == 0).nonzero().flatten().tolist()) != []:
        raise InvalidInput(
            f"a prototype head needs at least one training example of every class; none of class ids {missing}",
            missing_classes=missing,
        )
    class_means = torch.zeros_like(head.prototypes).index_add_(0, y, x) / counts[:, None]
    centre = class_means.mean(dim=0)
    z = normalised(x, centre)
    sums = torch.zeros_like(head.prototypes).index_add_(0, y, z)
    head.centre.copy_(centre)
    head.prototypes.copy_(F.normalize(sums, dim=1))
    head.temperature.fill_(fit_temperature(leave_one_out_cosines(z, y, sums, counts), y, counts))


def leave_one_out_cosines(z: Tensor, y: Tensor, sums: Tensor, counts: Tensor) -> Tensor:
    """Cosines [N, C] of each normalised example to every class mean, its own class's mean left without it."""
    cosines = z @ F.normalize(sums, dim=1).T
    rows = torch.arange(z.shape[0], device=z.device)
    own_without = F.normalize(sums[y] - z, dim=1)
    cosines[rows, y] = (z * own_without).sum(dim=1)
    return cosines


def fit_temperature(cosines: Tensor, y: Tensor, counts: Tensor) -> float:
    """The temperature in [MIN, MAX] minimising the mean cross-entropy of ``temperature * cosines``.

    The loss is convex in the temperature (a log-sum-exp of a linear function
    minus a linear term), so a golden-section search finds its minimum.
    """
    scored = counts[y] >= 2  # a lone example has no leave-one-out mean
    if not scored.any():
        return DEFAULT_TEMPERATURE
    cosines, y = cosines[scored].double(), y[scored]

    def loss(temperature: float) -> float:
        return F.cross_entropy(temperature * cosines, y).item()

    return golden_section_minimum(loss, MIN_TEMPERATURE, MAX_TEMPERATURE)
