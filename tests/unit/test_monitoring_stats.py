"""The statistics behind monitoring a head version (adapters/monitoring.py), on synthetic Gaussian embeddings."""

import json

import pytest
import torch
from sklearn.metrics import roc_auc_score

from adapters.errors import InvalidInput
from adapters.monitoring import (
    CONFIDENCE_BINS,
    DRIFT_TEST,
    MIN_DRIFT_ROWS,
    MonitoringReference,
    WindowStats,
)

D = 96
CLASSES = 4


def domain(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of CLASSES Gaussian clusters in a 12-D subspace of D with a little isotropic noise, plus ``shift``
    added to every coordinate: the same generator (seed 0) draws the domain, ``seed`` the rows."""
    layout = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, 12, generator=layout)).Q
    centres = torch.randn(CLASSES, 12, generator=layout) * 3
    rows = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=rows)
    z = centres[y] + torch.randn(n, 12, generator=rows)
    x = z @ basis.T + 0.1 * torch.randn(n, D, generator=rows) + shift
    return x, y


@pytest.fixture(scope="module")
def reference() -> MonitoringReference:
    x, y = domain(300, seed=1)
    return MonitoringReference.fit(x[:240], y[:240], x[240:], CLASSES)


def test_out_of_distribution_rows_score_higher_than_unseen_in_distribution_rows(reference):
    inside, _ = domain(500, seed=2)
    outside = torch.randn(500, D) * inside.std()  # same scale, none of the domain's structure
    scores = torch.cat([reference.ood_scores(inside), reference.ood_scores(outside)])
    truth = [0] * 500 + [1] * 500
    assert roc_auc_score(truth, scores.numpy()) > 0.99
    rate = float((reference.ood_scores(inside) > reference.ood_threshold).float().mean())
    assert 0.0 < rate < 0.15  # the threshold is the hold-out's 95th percentile: about 5 % of unseen rows pass it


def test_a_mean_shifted_window_drifts_and_in_distribution_windows_mostly_do_not(reference):
    shifted, _ = domain(100, seed=3, shift=0.4)
    test = reference.drift(shifted)
    assert test.drifting and test.p_value <= 0.01 and test.statistic > test.threshold
    assert test.window == 100 and test.test == DRIFT_TEST

    inside, _ = domain(20 * 100, seed=4)
    alarms = sum(reference.drift(window, seed=i).drifting for i, window in enumerate(inside.split(100)))
    assert alarms <= 2


def test_a_drift_test_is_reproducible_from_its_seed(reference):
    window, _ = domain(60, seed=5)
    assert reference.drift(window, seed=7) == reference.drift(window, seed=7)


def test_a_reference_stored_as_tensors_scores_and_tests_exactly_as_the_fitted_one(reference):
    tensors = reference.to_tensors()
    assert all(name.startswith("monitor.") for name in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["monitor.ood_threshold"].dim() == 0
    head = {"weight": torch.zeros(CLASSES, D)}  # a head's own tensors beside them are ignored
    loaded = MonitoringReference.from_tensors({**head, **tensors})

    x, _ = domain(50, seed=6)
    assert torch.equal(loaded.ood_scores(x), reference.ood_scores(x))
    assert loaded.ood_threshold == reference.ood_threshold
    assert loaded.drift(x) == reference.drift(x)
    assert all(torch.equal(loaded.to_tensors()[name], t) for name, t in tensors.items())


def test_the_reference_stays_under_a_megabyte_whatever_the_rows_and_dimensions():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5_000, 1280, generator=generator)
    y = torch.randint(0, 20, (5_000,), generator=generator)
    reference = MonitoringReference.fit(x[:4_500], y[:4_500], x[4_500:], 20)
    size = sum(t.numel() * t.element_size() for t in reference.to_tensors().values())
    assert size < 1_000_000
    assert reference.components.shape == (1280, 64)
    assert len(reference.reference) == 256


def test_fit_without_hold_out_rows_places_the_threshold_by_cross_fitting():
    x, y = domain(240, seed=1)
    reference = MonitoringReference.fit(x, y, torch.empty(0, D), CLASSES)
    inside, _ = domain(500, seed=2)
    outside = torch.randn(500, D) * inside.std()
    assert float((reference.ood_scores(inside) > reference.ood_threshold).float().mean()) < 0.1
    assert bool((reference.ood_scores(outside) > reference.ood_threshold).all())


def test_the_training_label_distribution_is_kept():
    x, y = domain(240, seed=1)
    y = torch.where(y == 3, 0, y)  # class 3 has no training rows
    reference = MonitoringReference.fit(x, y, x[:30], CLASSES)
    expected = torch.bincount(y, minlength=CLASSES).float() / len(y)
    assert torch.allclose(reference.label_distribution, expected)
    assert len(reference.class_means) == 3  # only the classes with rows have a mean


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, y: MonitoringReference.fit(x[0], y, x, CLASSES), "training features must be a float tensor"),
        (lambda x, y: MonitoringReference.fit(x, y[:-1], x, CLASSES), "one integer label per training row"),
        (lambda x, y: MonitoringReference.fit(x, y.float(), x, CLASSES), "one integer label per training row"),
        (lambda x, y: MonitoringReference.fit(x, y, x[:, :-1], CLASSES), "hold-out features must be a float tensor"),
        (lambda x, y: MonitoringReference.fit(x, y + CLASSES, x, CLASSES), "training labels must lie in"),
        (lambda x, y: MonitoringReference.fit(x[:5], y[:5], x, CLASSES), "at least 10 training rows"),
        (lambda x, y: MonitoringReference.fit(x * torch.nan, y, x, CLASSES), "NaN"),
        (lambda x, y: MonitoringReference.fit(x[:12], y[:12], x[:0], CLASSES), "more rows to place its OOD threshold"),
    ],
)
def test_fit_rejects_what_it_cannot_use(call, message):
    x, y = domain(40, seed=1)
    with pytest.raises(InvalidInput, match=message):
        call(x, y)


def test_scoring_and_testing_reject_embeddings_of_another_width(reference):
    with pytest.raises(InvalidInput, match=rf"embeddings must be a float tensor \[N, {D}\]"):
        reference.ood_scores(torch.zeros(3, D + 1))
    with pytest.raises(InvalidInput, match="window embeddings must be a float tensor"):
        reference.drift(torch.zeros(50))
    with pytest.raises(InvalidInput, match="at least 2 window rows"):
        reference.drift(torch.zeros(1, D))


def test_from_tensors_names_what_is_missing(reference):
    tensors = reference.to_tensors()
    del tensors["monitor.reference"]
    with pytest.raises(InvalidInput, match=r"lack the monitoring reference's monitor\.reference"):
        MonitoringReference.from_tensors(tensors)


def add_batch(stats: WindowStats, x: torch.Tensor, labels: torch.Tensor, reference: MonitoringReference) -> None:
    n = len(x)
    scores = torch.linspace(0.0, 1.0, n)
    stats.add(x, labels, scores, torch.arange(n) % 4 == 0, reference.ood_scores(x), reference.ood_threshold)


def test_a_window_under_capacity_keeps_every_row_and_exact_counts(reference):
    stats = WindowStats(CLASSES, capacity=100)
    x, y = domain(60, seed=7)
    add_batch(stats, x[:25], y[:25], reference)
    add_batch(stats, x[25:], y[25:], reference)
    assert torch.equal(stats.sample, x)
    assert stats.predictions == 60
    assert stats.label_counts == torch.bincount(y, minlength=CLASSES).tolist()
    assert sum(stats.confidence_histogram) == 60
    assert stats.confidence_histogram[-1] >= 2  # a score of exactly 1.0 falls in the last bin
    assert stats.abstentions == 7 + 9
    scores = torch.cat([reference.ood_scores(x[:25]), reference.ood_scores(x[25:])])
    assert stats.ood == int((scores > reference.ood_threshold).sum())
    assert stats.ood_score_sum == pytest.approx(float(scores.double().sum()))


def test_the_reservoir_is_capped_and_samples_the_whole_window_uniformly(reference):
    stats = WindowStats(CLASSES, capacity=50, seed=3)
    for start in range(0, 1000, 40):
        rows = torch.arange(start, start + 40, dtype=torch.float32)[:, None].expand(40, D)
        stats.add(
            rows,
            torch.zeros(40, dtype=torch.long),
            torch.ones(40),
            torch.zeros(40, dtype=torch.bool),
            torch.zeros(40),
            1.0,
        )
    assert stats.sample.shape == (50, D)
    assert stats.predictions == 1000
    kept = stats.sample[:, 0]
    assert len(kept.unique()) == 50
    assert 300 < float(kept.mean()) < 700  # drawn from the whole window, not just its first or last rows


def test_the_summary_reports_distributions_rates_and_the_drift_test(reference):
    stats = WindowStats(CLASSES, capacity=200)
    x, y = domain(80, seed=8)
    add_batch(stats, x, y, reference)
    summary = stats.summary(reference)
    json.dumps(summary)
    assert summary["predictions"] == 80
    assert summary["label_distribution"] == pytest.approx((torch.bincount(y, minlength=CLASSES) / 80).tolist())
    training = reference.label_distribution.tolist()
    assert summary["training_label_distribution"] == training
    tv = 0.5 * sum(abs(p - q) for p, q in zip(summary["label_distribution"], training, strict=True))
    assert summary["label_total_variation"] == pytest.approx(tv)
    assert len(summary["confidence_histogram"]) == CONFIDENCE_BINS
    assert summary["confidence_bins"][0] == 0.0 and summary["confidence_bins"][-1] == 1.0
    assert summary["abstention_rate"] == 20 / 80
    assert summary["ood_rate"] == stats.ood / 80
    assert summary["mean_ood_score"] == pytest.approx(stats.ood_score_sum / 80)
    assert summary["drift"]["window"] == 80
    assert summary["drift"]["test"] == DRIFT_TEST


def test_a_small_or_empty_window_has_no_drift_test_and_no_rates(reference):
    empty = WindowStats(CLASSES).summary(reference)
    assert empty["predictions"] == 0 and empty["ood_rate"] is None and empty["drift"] is None
    stats = WindowStats(CLASSES)
    x, y = domain(MIN_DRIFT_ROWS - 1, seed=9)
    add_batch(stats, x, y, reference)
    assert stats.summary(reference)["drift"] is None
    assert stats.summary(None)["label_total_variation"] is None


def test_a_window_rejects_batches_of_mismatched_shapes(reference):
    stats = WindowStats(CLASSES)
    x, y = domain(10, seed=10)
    with pytest.raises(InvalidInput, match="10 embeddings need 10 top scores"):
        stats.add(x, y, torch.ones(9), torch.zeros(10, dtype=torch.bool), torch.zeros(10), 1.0)
    with pytest.raises(InvalidInput, match=r"top labels must lie in \[0, 4\)"):
        stats.add(x, y + CLASSES, torch.ones(10), torch.zeros(10, dtype=torch.bool), torch.zeros(10), 1.0)
    add_batch(stats, x, y, reference)
    with pytest.raises(InvalidInput, match=rf"embeddings must be a float tensor \[N, {D}\]"):
        stats.add(x[:, :-1], y, torch.ones(10), torch.zeros(10, dtype=torch.bool), torch.zeros(10), 1.0)
