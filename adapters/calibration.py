"""Scores a client can trust: temperature scaling and split-conformal prediction sets, fitted on the hold-out.

A trained head's softmax is usually over- or under-confident. Temperature
scaling (Guo et al., 2017) divides its logits by one number T chosen to
minimise the hold-out's cross-entropy: the ranking, hence the accuracy, is
unchanged, and a score of 0.8 comes to mean "right about 80 % of the time".

Split-conformal prediction sets (the LAC score of Sadinle et al., 2019) then
answer "which labels, to contain the true one with probability c?". The
nonconformity of a hold-out example is 1 - its calibrated probability of its
true class; keeping them all (sorted) lets the server answer any coverage
later: the set is every label whose score passes the ceil((n+1)c)-th smallest
one. With n hold-out examples no coverage above n/(n+1) can be promised, and
``Calibration.max_coverage`` says so instead of returning a set that lies.

T and the scores come from the same hold-out; T is one number, so its effect on
the sets' exchangeability is slight (benchmarks/accuracy_calibration.py
measures the coverage on unseen images).
"""

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from adapters.errors import InvalidInput
from adapters.golden import golden_section_minimum
from adapters.metrics import calibration_error

# The temperatures searched. The bounds keep a tiny, perfectly separated hold-out from driving T to 0
# (every score 1.0) or a hopeless one from flattening every score to 1/C.
MIN_TEMPERATURE = 0.25
MAX_TEMPERATURE = 10.0
# Hold-out scores kept for the sets: a uniform random subsample of a larger hold-out is still exchangeable
# with new images, and bounds what each head version stores.
MAX_CONFORMAL_SCORES = 2000


class Calibration(BaseModel):
    """What a head version needs at serve time to turn logits into calibrated scores and prediction sets."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    temperature: float = Field(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    scores: list[float] = Field(
        min_length=1, max_length=MAX_CONFORMAL_SCORES, description="hold-out nonconformity scores, sorted ascending"
    )

    @property
    def max_coverage(self) -> float:
        """The largest coverage ``len(scores)`` exchangeable examples can promise: n / (n + 1)."""
        return len(self.scores) / (len(self.scores) + 1)

    def threshold(self, coverage: float) -> float:
        """The ceil((n + 1) * coverage)-th smallest score: labels scoring at most this are in the set."""
        n = len(self.scores)
        if not 0.0 < coverage <= self.max_coverage:
            raise InvalidInput(
                f"coverage {coverage:g} cannot be promised from {n} hold-out examples: at most {self.max_coverage:.4f}"
            )
        rank = math.ceil((n + 1) * coverage - 1e-9)  # (n+1)*0.9 may land a hair above an integer
        return self.scores[rank - 1]


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises the cross-entropy of ``logits / T``.

    The cross-entropy is convex in 1/T (a log-sum-exp of linear functions minus
    a linear one), so a golden-section search over 1/T finds the minimum.
    """
    logits, labels = _checked(logits, labels)
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)

    def loss(inverse: float) -> float:
        return float((torch.logsumexp(logits * inverse, dim=1) - true_logit * inverse).mean())

    return 1 / golden_section_minimum(loss, 1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE)


def calibrate(logits: Tensor, labels: Tensor, seed: int = 0) -> Calibration:
    """Temperature and conformal scores from a head's hold-out logits and true labels."""
    logits, labels = _checked(logits, labels)
    temperature = fit_temperature(logits, labels)
    probabilities = (logits / temperature).softmax(dim=1)
    scores = 1.0 - probabilities.gather(1, labels[:, None]).squeeze(1)
    if scores.numel() > MAX_CONFORMAL_SCORES:
        generator = torch.Generator().manual_seed(seed)
        scores = scores[torch.randperm(scores.numel(), generator=generator)[:MAX_CONFORMAL_SCORES]]
    return Calibration(temperature=temperature, scores=scores.sort().values.tolist())


def calibration_report(logits: Tensor, labels: Tensor, calibration: Calibration) -> dict[str, float | int]:
    """The hold-out's expected calibration error before and after scaling, for the version's metrics."""
    return {
        "temperature": calibration.temperature,
        "ece_before": calibration_error(logits, labels),
        "ece_after": calibration_error(logits / calibration.temperature, labels),
        "conformal_examples": len(calibration.scores),
        "max_coverage": calibration.max_coverage,
    }


def prediction_set(probabilities: Tensor, threshold: float) -> list[int]:
    """Classes whose nonconformity 1 - p passes ``threshold``, most likely first.

    The most likely class is always in: an empty set tells a client nothing, and
    adding a label can only raise the coverage.
    """
    order = probabilities.argsort(descending=True)
    return [int(i) for rank, i in enumerate(order) if rank == 0 or 1.0 - probabilities[i] <= threshold]


class TemperatureScaled(nn.Module):
    """A head whose logits are divided by its temperature: softmax of its output is the calibrated score."""

    def __init__(self, head: nn.Module, temperature: float) -> None:
        super().__init__()
        self.head = head
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x) / self.temperature


def _checked(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.shape[0] == 0:
        raise InvalidInput(
            f"calibration needs logits [N, C] and N labels, N >= 1; got {list(logits.shape)} and {list(labels.shape)}"
        )
    logits = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu", torch.int64)
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise InvalidInput(f"labels must lie in [0, {logits.shape[1] - 1}]")
    return logits, labels
