"""Monitoring a head version's traffic: an out-of-distribution score per image and a drift test per window.

A head sees only its backbone's pooled embeddings, so that is where traffic is compared with the training data.
``MonitoringReference`` is fitted once at training time and stored with the head's tensors, so it is compact
whatever the dataset's size (about 400 KB for D = 1280 and a few classes):

* The embeddings are projected on at most ``MAX_COMPONENTS`` principal components of the training rows (the axes
  rotated so that the shared within-class covariance is diagonal there, which makes whitening a per-axis scale).
* The OOD score is the class-conditional Mahalanobis distance in that subspace (the nearest class mean, one
  shared covariance shrunk towards its average variance so that a few hundred rows estimate it stably) plus the
  squared residual outside the subspace (an image unlike the training data often differs where the training
  data does not vary at all). Each term is divided by its typical value on the training rows, so they weigh
  alike. The threshold is the conformal ``OOD_QUANTILE`` quantile (the ceil((n + 1) q)-th smallest of n) of the
  hold-out's scores, which the scorer was not fitted on, so that an unseen in-distribution image exceeds it with
  probability at most 1 - q (scores of the rows a scorer was fitted on are too low and would set it too low).
  A hold-out too small to have that rank (under 19 rows for 0.95) is pooled with the training rows'
  cross-fitted scores, each fold scored by a scorer fitted on the others; those scorers saw fewer rows, so the
  threshold errs high (about 2 % of unseen textile images exceed it rather than 5 %).
* The drift test is a kernel two-sample test: the MMD (Gretton et al., 2012) with a Gaussian kernel, its width
  the median distance between reference rows, between a window's projected embeddings and a sample of at most
  ``REFERENCE_ROWS`` projected training and hold-out rows; its p-value comes from up to ``DRIFT_PERMUTATIONS``
  random relabellings of the pooled rows (drawn in batches, stopping once the window cannot drift), so it needs
  no asymptotics at ~100 rows and holds its level ``DRIFT_ALPHA`` whatever the embeddings' distribution.

``WindowStats`` accumulates one window of one version in memory bounded whatever its traffic.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from adapters.errors import InvalidInput

# Principal components kept: 64 x 1280 float32 is 320 KB, and textile and Fashion-MNIST embeddings are told apart
# from each other and from blurred copies equally well with 16 (benchmarked on mobilenet_v2 and efficientnet_lite2).
MAX_COMPONENTS = 64
# Rows the components and class means are fitted on (a seeded subsample beyond): bounds the fit's time.
MAX_FIT_ROWS = 4096
# Fewer training rows than this leave the subspace and covariance too noisy to monitor anything.
MIN_TRAIN_ROWS = 10
# Weight of the average variance in the shrunk within-class covariance.
SHRINKAGE = 0.1
# 95 % of in-distribution images score under the threshold: 5 % of them are flagged OOD by design.
OOD_QUANTILE = 0.95
CROSS_FIT_FOLDS = 5
# Projected rows kept for the drift test: 256 x 64 float32 is 64 KB.
REFERENCE_ROWS = 256
# A window drifts when its statistic beats all 999 relabellings (p = 0.001): at 100 images a window, a version
# served steadily raises a false alarm about once per 100,000 images, not once per 10,000 as at 0.01.
DRIFT_PERMUTATIONS = 999
DRIFT_ALPHA = 0.001
PERMUTATION_BATCH = 100  # relabellings drawn at a time (see MonitoringReference.drift)
DRIFT_TEST = "mmd-rbf-permutation"
# Rows of a window, for a service that closes windows by count; 100 detects a switch to another domain within
# one window while a window of unseen in-distribution images is flagged about once in 1 / DRIFT_ALPHA.
DEFAULT_WINDOW = 100
# A window with fewer sampled rows gets no drift test: its MMD is too noisy to be worth reporting.
MIN_DRIFT_ROWS = 30
CONFIDENCE_BINS = 10
PREFIX = "monitor."


class DriftTest(BaseModel):
    """One window's two-sample test against the reference: ``drifting`` when ``p_value`` <= DRIFT_ALPHA."""

    model_config = ConfigDict(frozen=True)

    statistic: float
    threshold: float  # the relabelled statistics' 1 - DRIFT_ALPHA quantile (of those drawn): above it is drift
    p_value: float
    drifting: bool
    window: int
    test: str


@dataclass(frozen=True, eq=False)
class MonitoringReference:
    """What serving needs to score images and test windows, fitted on a head version's training features.

    Tensors are float32 on the CPU: ``mean`` [D], ``components`` [D, K] (orthonormal columns), ``scales`` [K]
    (the shared within-class covariance's inverse standard deviations along them), ``class_means`` [P, K] (the
    whitened means of the P classes with training rows), ``label_distribution`` [C], ``reference`` [R, K] (the
    drift sample, projected but not whitened).
    """

    mean: Tensor
    components: Tensor
    scales: Tensor
    class_means: Tensor
    residual_weight: float  # 1 / the training rows' mean squared residual; 0 when K = D leaves none
    label_distribution: Tensor
    ood_threshold: float
    reference: Tensor
    bandwidth: float  # the squared kernel width: the median squared distance between reference rows

    @classmethod
    @torch.no_grad()
    def fit(
        cls, train_x: Tensor, train_y: Tensor, holdout_x: Tensor, num_classes: int, *, seed: int = 0
    ) -> "MonitoringReference":
        """Fit on training features [N, D] and labels [N] and the hold-out's features [M, D] (M may be 0).

        The scorer is fitted on the training rows alone, so that the hold-out's scores are those of unseen
        images; a hold-out too small to place the threshold is pooled with out-of-fold scores of the training
        rows (each fold scored by a scorer fitted on the other folds).
        """
        if num_classes < 1:
            raise InvalidInput(f"monitoring needs at least one class, got {num_classes}")
        train_x = _features("training features", train_x)
        holdout_x = _features("hold-out features", holdout_x, train_x.shape[1])
        if train_y.shape != (len(train_x),) or train_y.is_floating_point() or train_y.is_complex():
            raise InvalidInput(
                f"monitoring needs one integer label per training row: {tuple(train_y.shape)} labels "
                f"({train_y.dtype}) for {len(train_x)} rows"
            )
        train_y = train_y.to("cpu", torch.int64)
        if len(train_y) and not 0 <= int(train_y.min()) <= int(train_y.max()) < num_classes:
            raise InvalidInput(f"training labels must lie in [0, {num_classes}), got {train_y.min()}..{train_y.max()}")
        if len(train_x) < MIN_TRAIN_ROWS:
            raise InvalidInput(f"monitoring needs at least {MIN_TRAIN_ROWS} training rows, got {len(train_x)}")

        generator = torch.Generator().manual_seed(seed)
        label_distribution = torch.bincount(train_y, minlength=num_classes).double() / len(train_y)
        fit_rows = _subsample(len(train_x), MAX_FIT_ROWS, generator)
        scorer = _Scorer.fit(train_x[fit_rows], train_y[fit_rows])
        unseen = scorer.scores(holdout_x)
        if _conformal_rank(len(unseen)) > len(unseen):
            unseen = torch.cat([unseen, _cross_fitted_scores(train_x[fit_rows], train_y[fit_rows], generator)])
        if _conformal_rank(len(unseen)) > len(unseen):
            raise InvalidInput(
                f"monitoring needs more rows to place its OOD threshold at the {OOD_QUANTILE:g} quantile: "
                f"{len(unseen)} hold-out and cross-fitted training scores have no such rank"
            )
        threshold = unseen.sort().values[_conformal_rank(len(unseen)) - 1]

        pooled = torch.cat([train_x, holdout_x])
        reference = scorer.project(pooled[_subsample(len(pooled), REFERENCE_ROWS, generator)])
        distances = torch.cdist(reference, reference).square()
        off_diagonal = distances[~torch.eye(len(reference), dtype=torch.bool)]
        bandwidth = float(off_diagonal.median()) if len(off_diagonal) else 1.0
        return cls(
            mean=_f32(scorer.mean),
            components=_f32(scorer.components),
            scales=_f32(scorer.scales),
            class_means=_f32(scorer.class_means),
            residual_weight=_f32_value(scorer.residual_weight),
            label_distribution=_f32(label_distribution),
            ood_threshold=_f32_value(float(threshold)),
            reference=_f32(reference),
            bandwidth=_f32_value(max(bandwidth, torch.finfo(torch.float32).tiny)),
        )

    @torch.no_grad()
    def ood_scores(self, x: Tensor) -> Tensor:
        """[N] scores of embeddings [N, D]: about 2 for training-like images, higher the further they are."""
        x = _features("embeddings", x, len(self.mean)).float()
        return _ood_scores(x, self.mean, self.components, self.scales, self.class_means, self.residual_weight)

    @torch.no_grad()
    def drift(self, window_x: Tensor, *, seed: int = 0) -> DriftTest:
        """Test whether a window's embeddings [n, D] (n >= 2) come from the reference's distribution."""
        window_x = _features("window embeddings", window_x, len(self.mean)).float()
        if len(window_x) < 2:
            raise InvalidInput(f"a drift test needs at least 2 window rows, got {len(window_x)}")
        window = (window_x - self.mean) @ self.components
        pooled = torch.cat([self.reference, window])
        kernel = torch.exp(torch.cdist(pooled, pooled).square() / (-2 * self.bandwidth))
        m, n = len(self.reference), len(window)
        weights = torch.cat([torch.full((m,), 1 / m), torch.full((n,), -1 / n)])
        generator = torch.Generator().manual_seed(seed)
        statistic = float(weights @ kernel @ weights)
        nulls: list[Tensor] = []
        drawn = above = 0  # relabellings drawn, and those whose statistic is at least the window's
        allowed = DRIFT_ALPHA * (DRIFT_PERMUTATIONS + 1) - 1  # at most this many above still lets it drift
        # Besag and Clifford's sequential p-value: once more relabellings beat the window than a drifting p-value
        # allows, the rest cannot make it drift, so a window like the training data costs one batch, not all.
        while drawn < DRIFT_PERMUTATIONS and above <= allowed:
            count = min(PERMUTATION_BATCH, DRIFT_PERMUTATIONS - drawn)
            permuted = weights[torch.rand(count, m + n, generator=generator).argsort(dim=1)]
            nulls.append(((permuted @ kernel) * permuted).sum(dim=1))
            drawn += count
            above += int((nulls[-1] >= statistic).sum())
        null = torch.cat(nulls)
        p_value = (1 + above) / (drawn + 1)
        return DriftTest(
            statistic=statistic,
            threshold=float(torch.quantile(null, 1 - DRIFT_ALPHA)),
            p_value=p_value,
            drifting=p_value <= DRIFT_ALPHA,
            window=n,
            test=DRIFT_TEST,
        )

    def to_tensors(self) -> dict[str, Tensor]:
        """The reference as float32 tensors named ``monitor.*``, to be stored beside a head's own tensors."""
        tensors = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            tensors[PREFIX + name] = torch.tensor(value, dtype=torch.float32) if isinstance(value, float) else value
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "MonitoringReference":
        """The reference ``to_tensors`` stored; the other keys of ``tensors`` (the head's own) are ignored."""
        names = list(cls.__dataclass_fields__)
        missing = [PREFIX + name for name in names if PREFIX + name not in tensors]
        if missing:
            raise InvalidInput(f"the stored tensors lack the monitoring reference's {', '.join(missing)}")
        values: dict[str, Any] = {}
        for name in names:
            tensor = tensors[PREFIX + name].detach().to("cpu", torch.float32)
            values[name] = float(tensor) if cls.__dataclass_fields__[name].type is float else tensor
        reference = cls(**values)
        d, k = reference.components.shape
        shapes = {"mean": (d,), "scales": (k,), "class_means": (-1, k), "reference": (-1, k)}
        for name, shape in shapes.items():
            actual = tuple(getattr(reference, name).shape)
            if len(actual) != len(shape) or any(want not in (-1, got) for want, got in zip(shape, actual, strict=True)):
                raise InvalidInput(f"the stored {PREFIX}{name} has shape {actual}, expected {shape} (-1: any)")
        return reference


class WindowStats:
    """Counts of one window of one head version, and a uniform sample of at most ``capacity`` of its embeddings.

    Memory is O(capacity x D + C) whatever the traffic: the sample is a reservoir (algorithm R), so every
    prediction of the window is in it with the same probability, and all of them are while they fit.
    """

    def __init__(self, num_classes: int, *, capacity: int = DEFAULT_WINDOW, seed: int = 0) -> None:
        if num_classes < 1 or capacity < 1:
            raise InvalidInput(f"a window needs at least one class and one sampled row, got {num_classes}, {capacity}")
        self.num_classes = num_classes
        self.capacity = capacity
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.predictions = 0
        self.label_counts = [0] * num_classes
        self.confidence_histogram = [0] * CONFIDENCE_BINS
        self.abstentions = 0
        self.ood = 0
        self.ood_score_sum = 0.0
        self.sample: Tensor | None = None  # [min(predictions, capacity), D] float32

    def add(
        self,
        embeddings: Tensor,
        top_labels: Tensor,
        top_scores: Tensor,
        abstained: Tensor,
        ood_scores: Tensor,
        ood_threshold: float,
    ) -> None:
        """Count a batch of served predictions: embeddings [B, D], and [B] of each of the others.

        An abstained prediction still counts under its top label; ``ood`` counts scores above ``ood_threshold``.
        """
        dim = None if self.sample is None else self.sample.shape[1]
        embeddings = _features("embeddings", embeddings, dim).float()
        batch = len(embeddings)
        for name, values in {"top labels": top_labels, "top scores": top_scores, "abstained": abstained}.items():
            if values.shape != (batch,):
                raise InvalidInput(f"{batch} embeddings need {batch} {name}, got shape {tuple(values.shape)}")
        if ood_scores.shape != (batch,):
            raise InvalidInput(f"{batch} embeddings need {batch} OOD scores, got shape {tuple(ood_scores.shape)}")
        labels = top_labels.to("cpu", torch.int64)
        if batch and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise InvalidInput(f"top labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        scores = top_scores.to("cpu", torch.float64)
        ood = ood_scores.to("cpu", torch.float64)
        if not (torch.isfinite(scores).all() and torch.isfinite(ood).all()):
            raise InvalidInput("top scores and OOD scores must be finite")

        bins = (scores.clamp(0, 1) * CONFIDENCE_BINS).long().clamp(max=CONFIDENCE_BINS - 1)  # 1.0: the last bin
        _add_counts(self.label_counts, labels.bincount(minlength=self.num_classes))
        _add_counts(self.confidence_histogram, bins.bincount(minlength=CONFIDENCE_BINS))
        self.abstentions += int(abstained.to("cpu", torch.bool).sum())
        self.ood += int((ood > ood_threshold).sum())
        self.ood_score_sum += float(ood.sum())
        self._sample(embeddings.detach().cpu())
        self.predictions += batch

    def _sample(self, embeddings: Tensor) -> None:
        """Reservoir sampling: the window's row t (from 0) takes a random slot with probability capacity / (t + 1)."""
        kept = 0 if self.sample is None else len(self.sample)
        fill = min(self.capacity - kept, len(embeddings))
        if self.sample is None:
            self.sample = embeddings[:fill].clone()
        elif fill:
            self.sample = torch.cat([self.sample, embeddings[:fill]])
        seen = torch.arange(self.predictions + fill, self.predictions + len(embeddings), dtype=torch.float64)
        slots = (torch.rand(len(seen), generator=self.generator, dtype=torch.float64) * (seen + 1)).long()
        for row, slot in zip(embeddings[fill:], slots.tolist(), strict=True):
            if slot < self.capacity:
                self.sample[slot] = row

    def summary(self, reference: MonitoringReference | None) -> dict[str, Any]:
        """The window as JSON-able values; rates are None for an empty window, ``drift`` None without a test."""
        n = self.predictions
        distribution = [count / n for count in self.label_counts] if n else None
        training = None if reference is None else reference.label_distribution.tolist()
        distance = None
        if distribution is not None and training is not None:
            distance = 0.5 * sum(abs(p - q) for p, q in zip(distribution, training, strict=True))
        sampled = 0 if self.sample is None else len(self.sample)
        drift = None
        if reference is not None and self.sample is not None and sampled >= MIN_DRIFT_ROWS:
            drift = reference.drift(self.sample, seed=self.seed).model_dump()
        return {
            "predictions": n,
            "label_counts": list(self.label_counts),
            "label_distribution": distribution,
            "training_label_distribution": training,
            "label_total_variation": distance,
            "confidence_bins": [i / CONFIDENCE_BINS for i in range(CONFIDENCE_BINS + 1)],
            "confidence_histogram": list(self.confidence_histogram),
            "abstentions": self.abstentions,
            "abstention_rate": self.abstentions / n if n else None,
            "ood": self.ood,
            "ood_rate": self.ood / n if n else None,
            "mean_ood_score": self.ood_score_sum / n if n else None,
            "sampled": sampled,
            "drift": drift,
        }


@dataclass(frozen=True, eq=False)
class _Scorer:
    """The OOD scorer in float64, as fitted; ``MonitoringReference`` keeps it in float32."""

    mean: Tensor
    components: Tensor
    scales: Tensor
    class_means: Tensor
    residual_weight: float

    @classmethod
    def fit(cls, x: Tensor, y: Tensor) -> "_Scorer":
        x = x.double()
        mean = x.mean(dim=0)
        centred = x - mean
        k = min(MAX_COMPONENTS, x.shape[1], max(1, len(x) // 2))  # half the rows: the residual stays informative
        components = _principal_directions(centred, k)
        z = centred @ components
        classes, index = torch.unique(y, return_inverse=True)
        means = torch.zeros(len(classes), k, dtype=torch.float64).index_add_(0, index, z)
        means /= torch.bincount(index, minlength=len(classes))[:, None]
        within = z - means[index]
        covariance = within.T @ within / max(len(x) - len(classes), 1)
        average = float(covariance.diagonal().mean())
        covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * average * torch.eye(k, dtype=torch.float64)
        # Rotating the components onto the covariance's eigenvectors makes it diagonal in their coordinates.
        variances, rotation = torch.linalg.eigh(covariance)
        floor = max(average, 1.0) * 1e-12  # every class a single point: nothing varies, any scale will do
        scales = variances.clamp(min=floor).rsqrt()
        components = components @ rotation
        residual = (centred.square().sum(dim=1) - z.square().sum(dim=1)).clamp(min=0)
        total = float(centred.square().sum(dim=1).mean())
        typical = float(residual.mean())
        residual_weight = 1 / typical if typical > 1e-9 * total else 0.0
        return cls(mean, components, scales, (means @ rotation) * scales, residual_weight)

    def project(self, x: Tensor) -> Tensor:
        return (x.double() - self.mean) @ self.components

    def scores(self, x: Tensor) -> Tensor:
        return _ood_scores(x.double(), self.mean, self.components, self.scales, self.class_means, self.residual_weight)


def _principal_directions(centred: Tensor, k: int) -> Tensor:
    """The top ``k`` principal directions [D, k] (unit columns) of centred rows [N, D], from the smaller of the two
    Gram eigenproblems: every training job fits one, and an SVD of all the rows costs several times more."""
    n, d = centred.shape
    if n > d:
        return torch.linalg.eigh(centred.T @ centred).eigenvectors.flip(1)[:, :k]
    vectors = torch.linalg.eigh(centred @ centred.T).eigenvectors.flip(1)[:, :k]
    directions = centred.T @ vectors  # each column is its eigenvalue's square root times a unit direction
    return directions / directions.norm(dim=0).clamp(min=torch.finfo(directions.dtype).tiny)


def _ood_scores(
    x: Tensor, mean: Tensor, components: Tensor, scales: Tensor, class_means: Tensor, residual_weight: float
) -> Tensor:
    """Nearest-class squared Mahalanobis distance / K + squared residual / its training mean, in x's dtype."""
    centred = x - mean
    z = centred @ components
    mahalanobis = torch.cdist(z * scales, class_means).square().min(dim=1).values
    residual = (centred.square().sum(dim=1) - z.square().sum(dim=1)).clamp(min=0)
    return mahalanobis / len(scales) + residual * residual_weight


def _cross_fitted_scores(x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
    """Each training row scored by a scorer fitted on the other CROSS_FIT_FOLDS - 1 folds."""
    folds = torch.randperm(len(x), generator=generator).chunk(CROSS_FIT_FOLDS)
    scores = []
    for i, held in enumerate(folds):
        rest = torch.cat([fold for j, fold in enumerate(folds) if j != i])
        scores.append(_Scorer.fit(x[rest], y[rest]).scores(x[held]))
    return torch.cat(scores)


def _conformal_rank(n: int) -> int:
    """The rank (1-based) of the conformal OOD_QUANTILE quantile of n scores; above n when n is too few."""
    return math.ceil((n + 1) * OOD_QUANTILE - 1e-9)  # (n + 1) * 0.95 may land a hair above an integer


def _features(what: str, x: Tensor, dim: int | None = None) -> Tensor:
    """x as a float CPU tensor [N, D] (D = dim when given) of finite values, or InvalidInput saying what is wrong."""
    if x.dim() != 2 or (dim is not None and x.shape[1] != dim) or not x.is_floating_point():
        expected = "[N, D]" if dim is None else f"[N, {dim}]"
        raise InvalidInput(f"{what} must be a float tensor {expected}, got {x.dtype} of shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise InvalidInput(f"{what} have no dimensions (shape {tuple(x.shape)})")
    x = x.detach().cpu()
    if not torch.isfinite(x).all():
        raise InvalidInput(f"{what} contain NaN or infinite values")
    return x


def _subsample(n: int, cap: int, generator: torch.Generator) -> Tensor:
    """Indices of all n rows, or of a seeded uniform sample of ``cap`` of them in their order."""
    if n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:cap].sort().values


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.float32).contiguous()


def _f32_value(value: float) -> float:
    """``value`` rounded to float32, so that storing it as a float32 tensor loses nothing."""
    return float(torch.tensor(value, dtype=torch.float32))


def _add_counts(counts: list[int], new: Tensor) -> None:
    for i, count in enumerate(new.tolist()):
        counts[i] += count
