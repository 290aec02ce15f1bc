"""The recipe choices around a head's weights: feature scaling, class weighting, and what "best" means.

Each is a registry of named records, in order of simplicity (the one-standard-
error rule, adapters/crossval.py, prefers an earlier one when the evidence
cannot tell them apart):

- SCALINGS: how pooled features are scaled before the head reads them. The
  head carries its scaling (adapters/heads.py), so whoever loads it feeds raw
  features.
- CLASS_WEIGHTINGS: how much each training example's loss counts.
- OBJECTIVES: the score a search maximises; each names the class weighting
  that follows from it.
"""

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from adapters.errors import InvalidInput

# A feature whose spread is below this is treated as constant: it is centred but
# not scaled, the same rule as scikit-learn's StandardScaler.
MIN_STD = 1e-6


@dataclass(frozen=True)
class ScalingSpec:
    """One way to scale pooled features [N, D]: rows to length sqrt(D) first (``unit_rows``), then each feature
    centred and divided by its spread on the training split (``standardise``)."""

    name: str
    description: str
    unit_rows: bool
    standardise: bool


@dataclass(frozen=True)
class ClassWeightingSpec:
    name: str
    description: str
    balanced: bool  # each class's examples weigh 1 / its count (normalised to mean 1), else every example weighs 1


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    description: str
    class_weighting: str  # the weighting that follows from it, unless a request sets one


SCALINGS = {
    spec.name: spec
    for spec in (
        ScalingSpec("none", "the pooled features as the backbone gives them", unit_rows=False, standardise=False),
        ScalingSpec(
            "standardise",
            "each feature centred and divided by its spread on the training split",
            unit_rows=False,
            standardise=True,
        ),
        ScalingSpec(
            "l2",
            "each image's features scaled to length sqrt(D) (unit length, times a constant the penalty absorbs)",
            unit_rows=True,
            standardise=False,
        ),
    )
}
CLASS_WEIGHTINGS = {
    spec.name: spec
    for spec in (
        ClassWeightingSpec("none", "every training example counts the same", balanced=False),
        ClassWeightingSpec("balanced", "every class counts the same, however many examples it has", balanced=True),
    )
}
OBJECTIVES = {
    spec.name: spec
    for spec in (
        ObjectiveSpec("accuracy", "the share of images classified right, on data distributed like the upload", "none"),
        ObjectiveSpec(
            "balanced_accuracy", "the mean over classes of each class's recall: every class counts the same", "balanced"
        ),
    )
}

Scaling = Enum("Scaling", {name.upper(): name for name in SCALINGS}, type=str)  # type: ignore[misc]
Scaling.__doc__ = "How pooled features are scaled.\n\n" + "\n".join(
    f"- {s.name}: {s.description}" for s in SCALINGS.values()
)
ClassWeighting = Enum("ClassWeighting", {name.upper(): name for name in CLASS_WEIGHTINGS}, type=str)  # type: ignore[misc]
ClassWeighting.__doc__ = "How much each example's loss counts.\n\n" + "\n".join(
    f"- {s.name}: {s.description}" for s in CLASS_WEIGHTINGS.values()
)
Objective = Enum("Objective", {name.upper(): name for name in OBJECTIVES}, type=str)  # type: ignore[misc]
Objective.__doc__ = "What 'best' means to a search.\n\n" + "\n".join(
    f"- {s.name}: {s.description}" for s in OBJECTIVES.values()
)


def _lookup(registry: dict, kind: str, value: object) -> object:
    name = value.value if isinstance(value, Enum) else value
    try:
        return registry[name]
    except KeyError:
        raise InvalidInput(f"unknown {kind} {name!r}; known: {', '.join(registry)}") from None


def get_scaling(value: "str | Scaling") -> ScalingSpec:
    return _lookup(SCALINGS, "scaling", value)  # type: ignore[return-value]


def get_class_weighting(value: "str | ClassWeighting") -> ClassWeightingSpec:
    return _lookup(CLASS_WEIGHTINGS, "class weighting", value)  # type: ignore[return-value]


def get_objective(value: "str | Objective") -> ObjectiveSpec:
    return _lookup(OBJECTIVES, "objective", value)  # type: ignore[return-value]


def unit_rows(x: Tensor) -> Tensor:
    """Rows of x [N, D] scaled to length sqrt(D) (a zero row stays zero): features of about unit size."""
    return torch.nn.functional.normalize(x, dim=-1) * math.sqrt(x.shape[-1])


def scaling_stats(x: Tensor, scaling: "str | Scaling") -> tuple[Tensor, Tensor]:
    """The per-feature (mean, std) a head of ``scaling`` keeps, from training features x [N, D]."""
    spec = get_scaling(scaling)
    if not spec.standardise:
        return torch.zeros(x.shape[1], dtype=x.dtype, device=x.device), torch.ones(
            x.shape[1], dtype=x.dtype, device=x.device
        )
    rows = unit_rows(x) if spec.unit_rows else x
    mean = rows.mean(dim=0)
    std = rows.std(dim=0, unbiased=False)
    return mean, torch.where(std < MIN_STD, torch.ones_like(std), std)


def scaled(x: Tensor, scaling: "str | Scaling", mean: Tensor, std: Tensor) -> Tensor:
    """x [N, D] as a head of ``scaling`` with these statistics reads it."""
    rows = unit_rows(x) if get_scaling(scaling).unit_rows else x
    return (rows - mean) / std


def class_weights(y: Tensor, num_classes: int, weighting: "str | ClassWeighting") -> Tensor | None:
    """Per-class loss weights [C] for ``weighting``: None for equal weights; balanced: inverse class frequency,
    normalised to mean 1 over the classes present (absent classes 0)."""
    if not get_class_weighting(weighting).balanced:
        return None
    counts = torch.bincount(y.detach().to("cpu", torch.int64), minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = 1.0 / counts[present]
    weights[present] /= weights[present].mean()
    return weights.float()


def score(objective: "str | Objective", predicted: Tensor, y: Tensor, num_classes: int) -> float:
    """``objective`` of predicted labels against the true ones (balanced accuracy over the classes present)."""
    correct = (predicted == y).float()
    if get_objective(objective).name == "accuracy":
        return float(correct.mean())
    counts = torch.bincount(y, minlength=num_classes).float()
    hits = torch.bincount(y, weights=correct, minlength=num_classes)
    present = counts > 0
    return float((hits[present] / counts[present]).mean())
