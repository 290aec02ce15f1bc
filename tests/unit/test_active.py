import pytest
import torch

from adapters.active import DEFAULT_STRATEGY, STRATEGIES, suggest
from adapters.errors import InvalidInput
from adapters.logistic import solve

CLASSES = ["a", "b", "c", "d"]


def blobs(per_class: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in 16 dimensions, each with a tight sub-cluster of near-copies, labels 0-3."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(CLASSES), 16, generator=g) * 2.5
    y = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    x = centres[y] + spread * torch.randn(len(y), 16, generator=g) + 8.0  # away from the origin: cosine geometry
    return x, y


def head_probs(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    solution = solve(x, y, len(CLASSES), torch.full((1, len(y)), 1 / len(y)), torch.tensor([1e-2]))
    return torch.softmax(solution.logits(pool)[0], dim=1)


def uniform_probs(n: int) -> torch.Tensor:
    return torch.full((n, len(CLASSES)), 1 / len(CLASSES))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_returns_count_distinct_suggestions_with_reasons(strategy: str) -> None:
    x, y = blobs(50, 0)
    probs = head_probs(x[::25], y[::25], x)
    out = suggest(x, probs, x[::25], 12, strategy=strategy, classes=CLASSES, set_threshold=0.9)
    assert len(out) == 12
    assert len({s.index for s in out}) == 12
    assert all(s.reason.startswith("margin ") and "between '" in s.reason for s in out)
    assert all(0 <= s.index < len(x) for s in out)


def test_exact_copies_of_labelled_images_and_of_each_other_are_not_suggested() -> None:
    x, _ = blobs(30, 1)
    pool = torch.cat([x, x[:10], x[:10] * 1.0001])  # rows 0-9 three times over, a scaled copy is the same direction
    labelled = x[10:20]
    probs = uniform_probs(len(pool))
    probs[:10] = probs[120:130] = probs[130:] = torch.tensor([0.3, 0.3, 0.2, 0.2])  # equally unsure everywhere
    for strategy in STRATEGIES:
        out = suggest(pool, probs, labelled, 40, strategy=strategy, set_threshold=0.9)
        chosen = [s.index for s in out]
        assert not {i for i in chosen if 10 <= i < 20}, strategy  # the labelled images themselves
        originals = [i % 120 if i >= 120 else i for i in chosen]
        originals = [i - 10 if i >= 130 else i for i in originals]
        assert len(set(originals)) == len(originals), strategy


def test_unsure_images_are_preferred_to_confident_ones() -> None:
    x, _ = blobs(50, 2)
    probs = torch.tensor([0.97, 0.01, 0.01, 0.01]).repeat(len(x), 1)
    unsure = torch.arange(0, len(x), 2)  # 100 images over every blob: the default groups the 10 x count least sure
    probs[unsure] = torch.tensor([0.4, 0.35, 0.15, 0.1])
    labelled = x[1::10]  # 20 confident images: enough labels per class for the default to rank by uncertainty
    for strategy in ("diverse_margin", "margin"):
        out = suggest(x, probs, labelled, 10, strategy=strategy)
        assert {s.index for s in out} <= set(unsure.tolist()), strategy
        assert all(s.margin == pytest.approx(0.05, abs=1e-6) for s in out)


def test_the_default_spreads_its_picks_over_the_blobs_where_margin_bunches_them() -> None:
    x, y = blobs(50, 3)
    probs = uniform_probs(len(x)) + 0.0
    probs[:, 0] += torch.linspace(0, 0.1, len(x))  # blob 0 (rows 0-49) the least sure, by a hair
    probs /= probs.sum(dim=1, keepdim=True)
    diverse = suggest(x, probs, x[:0], 20, strategy=DEFAULT_STRATEGY)
    bunched = suggest(x, probs, x[:0], 20, strategy="margin")
    assert len({int(y[s.index]) for s in bunched}) == 1
    assert len({int(y[s.index]) for s in diverse}) == len(CLASSES)


def test_the_same_seed_gives_the_same_suggestions_and_another_seed_may_differ() -> None:
    x, y = blobs(50, 4)
    probs = head_probs(x[::20], y[::20], x)
    for strategy in STRATEGIES:
        first = suggest(x, probs, x[::20], 10, strategy=strategy, seed=7, set_threshold=0.9)
        assert first == suggest(x, probs, x[::20], 10, strategy=strategy, seed=7, set_threshold=0.9)
    assert suggest(x, probs, x[:0], 10, strategy="random", seed=1) != suggest(
        x, probs, x[:0], 10, strategy="random", seed=2
    )


def test_a_pool_smaller_than_count_gives_every_image_once() -> None:
    x, _ = blobs(2, 5)
    for strategy in STRATEGIES:
        out = suggest(x, uniform_probs(len(x)), x[:0], 20, strategy=strategy, set_threshold=0.9)
        assert sorted(s.index for s in out) == list(range(len(x)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"count": 0}, "count must be at least 1"),
        ({"pool_probs": uniform_probs(9)}, "pool_probs must be [8, C]"),
        ({"labelled_x": torch.zeros(3, 5)}, "labelled_x must be [L, 16]"),
        ({"pool_x": torch.full((8, 16), float("nan"))}, "pool_x holds NaN"),
        ({"pool_probs": torch.zeros(8, 4)}, "must be probabilities"),
        ({"classes": ["a"]}, "1 class names given for 4 classes"),
        ({"strategy": "psychic"}, "unknown strategy 'psychic'"),
    ],
)
def test_bad_inputs_are_refused_with_what_is_wrong(change: dict, message: str) -> None:
    x, _ = blobs(2, 6)
    arguments = {"pool_x": x, "pool_probs": uniform_probs(8), "labelled_x": x[:2], "count": 3} | change
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[")):
        suggest(**arguments)


def test_the_default_learns_faster_than_random_choice_in_a_small_labelling_loop() -> None:
    """Overlapping blobs, 1 label per class to start, 5 rounds of 4: accuracy summed over rounds and seeds."""
    totals = dict.fromkeys(("random", DEFAULT_STRATEGY), 0.0)
    for seed in range(4):
        x, y = blobs(100, 10 + seed, spread=2.5)
        test_x, test_y = x[1::2], y[1::2]
        pool_x, pool_y = x[::2], y[::2]
        for strategy in totals:
            labelled = [int(torch.nonzero(pool_y == c)[0]) for c in range(len(CLASSES))]
            for round_ in range(6):
                probs = head_probs(pool_x[labelled], pool_y[labelled], torch.cat([pool_x, test_x]))
                totals[strategy] += float((probs[len(pool_x) :].argmax(1) == test_y).float().mean())
                rest = [i for i in range(len(pool_x)) if i not in labelled]
                out = suggest(
                    pool_x[rest], probs[rest], pool_x[labelled], 4, strategy=strategy, seed=seed * 10 + round_
                )
                labelled += [rest[s.index] for s in out]
    assert totals[DEFAULT_STRATEGY] > totals["random"]


def test_set_size_ranks_the_largest_conformal_sets_first_and_needs_a_threshold() -> None:
    x, _ = blobs(10, 4)
    probs = torch.tensor([0.97, 0.01, 0.01, 0.01]).repeat(len(x), 1)
    probs[5] = torch.tensor([0.3, 0.3, 0.2, 0.2])  # four labels within the threshold
    probs[7] = torch.tensor([0.5, 0.45, 0.03, 0.02])  # two, and the smallest margin of all the two-label sets
    probs[9] = torch.tensor([0.6, 0.38, 0.01, 0.01])  # two
    out = suggest(x, probs, x[:0], 3, strategy="set_size", set_threshold=0.9)
    assert [s.index for s in out] == [5, 7, 9]
    assert out[0].reason.endswith("its prediction set holds 4 labels") and out[0].score == 4
    with pytest.raises(InvalidInput, match="conformal calibration"):
        suggest(x, probs, x[:0], 3, strategy="set_size")


def test_with_few_labels_the_default_covers_the_pool_by_typical_images_whatever_the_margins() -> None:
    x, y = blobs(50, 6, spread=0.5)
    probs = torch.tensor([0.97, 0.01, 0.01, 0.01]).repeat(len(x), 1)
    probs[y == 0] = torch.tensor([0.4, 0.35, 0.15, 0.1])  # only blob 0 unsure: uncertainty would stay there
    out = suggest(x, probs, x[::50], 8, strategy=DEFAULT_STRATEGY)  # 4 labels: 1 per class, below the cold start
    assert {int(y[s.index]) for s in out} == set(range(len(CLASSES)))
    assert all("covered first" in s.reason for s in out)
    warm = suggest(x, probs, x[::4], 8, strategy=DEFAULT_STRATEGY)  # 50 labels: past it, the unsure blob first
    assert int(y[warm[0].index]) == 0 and not any("covered first" in s.reason for s in warm)
