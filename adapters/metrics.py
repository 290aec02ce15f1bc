"""Evaluation of a head's logits on labelled examples."""

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor

from adapters.errors import InvalidInput

# Equal-width confidence bins for the expected calibration error (the usual 15).
ECE_BINS = 15


class ClassMetrics(BaseModel):
    label: str
    precision: float
    recall: float
    f1: float
    support: int


class ReliabilityBin(BaseModel):
    """One confidence bin (lo, hi] of the reliability curve: how sure the head was against how often it was right."""

    lo: float
    hi: float
    count: int
    confidence: float | None  # mean top-1 probability in the bin; None when it is empty
    accuracy: float | None


class EvalMetrics(BaseModel):
    accuracy: float
    balanced_accuracy: float  # mean recall over the classes present: every class counts the same
    per_class: list[ClassMetrics]
    confusion: list[list[int]]  # rows = true class, columns = predicted class
    ece: float
    reliability: list[ReliabilityBin]  # the ECE_BINS bins the ECE sums over, for a reliability diagram
    num_examples: int
    loss: float  # mean cross-entropy


def evaluate(logits: Tensor, labels: Tensor, class_names: list[str]) -> EvalMetrics:
    """Accuracy and balanced accuracy, per-class precision/recall/F1, confusion, calibration and loss."""
    num_classes = len(class_names)
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise InvalidInput(
            f"logits must have shape [N, {num_classes}] for {num_classes} classes, got {list(logits.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.shape[0] == 0:
        raise InvalidInput(
            f"labels must be a non-empty 1-D tensor with one label per row of logits, "
            f"got {list(labels.shape)} for {logits.shape[0]} rows"
        )
    logits = logits.detach().to("cpu", torch.float32)
    labels = labels.detach().to("cpu", torch.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InvalidInput(f"labels must lie in [0, {num_classes - 1}]")

    probabilities = logits.softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = predicted == labels
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    bins = _reliability(confidence, correct)
    support = confusion.sum(dim=1)
    present = support > 0

    return EvalMetrics(
        accuracy=correct.float().mean().item(),
        balanced_accuracy=(confusion.diag()[present].double() / support[present]).mean().item(),
        per_class=_per_class(confusion, class_names),
        confusion=confusion.tolist(),
        ece=_expected_calibration_error(bins),
        reliability=bins,
        num_examples=labels.shape[0],
        loss=F.cross_entropy(logits, labels).item(),
    )


def calibration_error(logits: Tensor, labels: Tensor) -> float:
    """Expected calibration error of ``logits``' top-1 softmax scores (the same bins as ``evaluate``)."""
    confidence, predicted = logits.detach().to("cpu", torch.float32).softmax(dim=1).max(dim=1)
    return _expected_calibration_error(_reliability(confidence, predicted == labels.detach().to("cpu")))


def _per_class(confusion: Tensor, class_names: list[str]) -> list[ClassMetrics]:
    """Precision, recall and F1 per class; an empty denominator counts as 0, never NaN."""
    true_positives = confusion.diag().double()
    predicted_counts = confusion.sum(dim=0).double()
    support = confusion.sum(dim=1)
    precision = true_positives / predicted_counts.clamp(min=1)
    recall = true_positives / support.double().clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))
    return [
        ClassMetrics(
            label=name,
            precision=precision[i].item(),
            recall=recall[i].item(),
            f1=f1[i].item(),
            support=int(support[i]),
        )
        for i, name in enumerate(class_names)
    ]


def _reliability(confidence: Tensor, correct: Tensor) -> list[ReliabilityBin]:
    """Mean confidence and accuracy in each of ECE_BINS equal-width bins (lo, hi]."""
    edges = torch.linspace(0.0, 1.0, ECE_BINS + 1)
    bin_of = torch.bucketize(confidence, edges[1:-1])
    bins = []
    for index in range(ECE_BINS):
        in_bin = bin_of == index
        count = int(in_bin.sum())
        bins.append(
            ReliabilityBin(
                lo=edges[index].item(),
                hi=edges[index + 1].item(),
                count=count,
                confidence=confidence[in_bin].mean().item() if count else None,
                accuracy=correct[in_bin].float().mean().item() if count else None,
            )
        )
    return bins


def _expected_calibration_error(bins: list[ReliabilityBin]) -> float:
    """Gap between confidence and accuracy, weighted by each bin's share of the examples."""
    total = sum(b.count for b in bins)
    return sum(b.count / total * abs(b.accuracy - b.confidence) for b in bins if b.count)  # type: ignore[operator]


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, through dicts and lists.

    Metrics end up in JSON and protobuf Structs, which have no NaN or infinity:
    a diverged training run must read as "no number", not fail the response.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value
