"""What to label next: rank a pool's unlabelled images by how much a label would teach a head.

With 20 to 200 labels, the images a head is least sure of (smallest margin
between its two likeliest classes) are informative but bunched: twenty of them
are often one confusion seen twenty times, or odd outliers that teach nothing
about the rest. The default strategy keeps the uncertain candidates, groups them
in embedding space, and takes from each group its most typical image weighted
by its uncertainty (margin sampling diversified by k-means, with TypiClust's
typicality), so one request covers several confusions with images that stand
for many others. Below COLD_START_PER_CLASS labels per class the head's
uncertainty is uninformed (its unsure images bunch on one boundary), so the
default covers the pool first: the most typical image of each of ``count``
groups of the whole pool (TypiClust's low-budget regime).
benchmarks/active_learning.py measures it against random labels.

Every strategy skips near-duplicates of the labelled images and of its own
picks. Embeddings are compared as unit rows (cosine geometry); a near-duplicate
lies closer than DUPLICATE_FRACTION of the typical nearest-neighbour distance.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor

from adapters.errors import InvalidInput

CANDIDATES_PER_PICK = 10  # the uncertain candidates the diverse strategy groups, per image asked for
NEIGHBOURS = 20  # typicality: inverse mean distance to this many nearest pool images (TypiClust's choice)
KMEANS_STEPS = 20
AXES = 64  # the diverse strategy compares images on the pool's leading principal axes: denoised, and cheap
AXES_ROWS = 2000  # evenly spaced pool rows the axes are estimated from
DUPLICATE_FRACTION = 0.5  # of the candidates' median nearest-neighbour distance: closer is the same image
COLD_START_PER_CLASS = 3  # fewer labelled images per class than this: the default covers the pool first
PROBABILITY_SLACK = 1e-3  # pool_probs rows must sum to 1 within this (logits passed by mistake do not)


class Suggestion(BaseModel):
    """One image worth labelling and why."""

    index: int  # row of the pool
    score: float  # the strategy's own ranking value, higher first; comparable within one answer only
    margin: float  # the head's top probability minus its second: small is unsure
    cluster: int | None = None  # the group of candidates it was taken from, where the strategy groups them
    reason: str


@dataclass(frozen=True)
class _Pool:
    """A request's inputs in the form every strategy reads."""

    z: Tensor  # [P, D] unit rows of the pool
    labelled: Tensor  # [L, D] unit rows of the labelled images
    margin: Tensor  # [P]
    first: Tensor  # [P] the likeliest class
    second: Tensor  # [P] the runner-up
    classes: Sequence[str] | None
    num_classes: int
    set_size: Tensor | None  # [P] labels in each image's conformal prediction set; None: the head has no calibration

    def confusion(self, i: int) -> str:
        """'margin 0.04 between 'shirt' and 't-shirt'' for pool row i."""
        a, b = int(self.first[i]), int(self.second[i])
        names = self.classes
        first, second = (repr(names[a]), repr(names[b])) if names is not None else (f"class {a}", f"class {b}")
        return f"margin {float(self.margin[i]):.3f} between {first} and {second}"


@dataclass(frozen=True)
class _Pick:
    index: int
    score: float
    note: str
    cluster: int | None = None


Rank = Callable[[_Pool, int, torch.Generator], list[_Pick]]


@dataclass(frozen=True)
class StrategySpec:
    """One way to choose images: ``rank`` returns picks best first, more than asked for where it can (the
    caller drops near-duplicates and keeps ``count``)."""

    name: str
    description: str
    rank: Rank


def _diverse_margin(pool: _Pool, count: int, generator: torch.Generator) -> list[_Pick]:
    """The CANDIDATES_PER_PICK x count least sure images in ``count`` k-means groups; from each group, the one
    with the largest typicality x uncertainty; groups in order of their summed uncertainty. With fewer than
    COLD_START_PER_CLASS labelled images per class: ``_cover`` instead."""
    if len(pool.labelled) < COLD_START_PER_CLASS * pool.num_classes:
        return _cover(pool, count, generator)
    candidates = pool.margin.argsort()[: CANDIDATES_PER_PICK * count]
    projected = _principal(pool.z, generator)
    z = projected[candidates]
    uncertainty = 1 - pool.margin[candidates]
    k = min(count, len(candidates))
    groups = _kmeans(z, k, generator)
    typical = _typicality(z, projected)
    mass = torch.zeros(k).index_add_(0, groups, uncertainty)
    picks = []
    for g in mass.argsort(descending=True).tolist():
        members = torch.nonzero(groups == g)[:, 0]
        if len(members) == 0:
            continue
        value = typical[members] / typical[members].max() * uncertainty[members]
        best = int(members[value.argmax()])
        picks.append(
            _Pick(
                int(candidates[best]),
                float(mass[g]),
                f"the most typical of {len(members)} unsure images in its group",
                cluster=g,
            )
        )
    chosen = {p.index for p in picks}
    picks += [  # reserves, should near-duplicates take some picks out
        _Pick(int(i), 0.0, "among the least sure beyond the groups' picks") for i in candidates if int(i) not in chosen
    ]
    return picks


def _cover(pool: _Pool, count: int, generator: torch.Generator) -> list[_Pick]:
    """The whole pool in ``count`` k-means groups; from each, its most typical image; largest groups first."""
    projected = _principal(pool.z, generator)
    k = min(count, len(projected))
    groups = _kmeans(projected, k, generator)
    typical = _typicality(projected, projected)
    sizes = torch.bincount(groups, minlength=k)
    picks = []
    for g in sizes.argsort(descending=True).tolist():
        members = torch.nonzero(groups == g)[:, 0]
        if len(members) == 0:
            continue
        best = int(members[typical[members].argmax()])
        note = f"few labels yet, so the pool is covered first: the most typical of {len(members)} images in its group"
        picks.append(_Pick(best, float(sizes[g]), note, cluster=g))
    chosen = {p.index for p in picks}
    picks += [  # reserves, should near-duplicates take some picks out
        _Pick(int(i), 0.0, "among the most typical images beyond the groups' picks")
        for i in typical.argsort(descending=True)
        if int(i) not in chosen
    ]
    return picks


def _margin(pool: _Pool, count: int, generator: torch.Generator) -> list[_Pick]:
    return [_Pick(int(i), 1 - float(pool.margin[i]), "among the least sure") for i in pool.margin.argsort()]


def _set_size(pool: _Pool, count: int, generator: torch.Generator) -> list[_Pick]:
    if pool.set_size is None:
        raise InvalidInput(
            "strategy 'set_size' needs the head's conformal calibration (a threshold on 1 - p); this head has none"
        )
    by_margin = pool.margin.argsort(stable=True)
    order = by_margin[pool.set_size[by_margin].argsort(descending=True, stable=True)]  # largest sets, then margin
    return [
        _Pick(int(i), float(pool.set_size[i]), f"its prediction set holds {int(pool.set_size[i])} labels")
        for i in order
    ]


def _random(pool: _Pool, count: int, generator: torch.Generator) -> list[_Pick]:
    return [
        _Pick(int(i), 0.0, "drawn at random") for i in torch.randperm(len(pool.margin), generator=generator).tolist()
    ]


STRATEGIES = {
    spec.name: spec
    for spec in (
        StrategySpec(
            "diverse_margin",
            "the least sure images, grouped in embedding space; from each group its most typical unsure image "
            f"(below {COLD_START_PER_CLASS} labels per class: the most typical image of each group of the whole pool)",
            _diverse_margin,
        ),
        StrategySpec("margin", "the images with the smallest margin between the head's two likeliest classes", _margin),
        StrategySpec("random", "images drawn at random: the baseline the others must beat", _random),
        StrategySpec(
            "set_size",
            "the images whose conformal prediction set (90 % coverage) holds the most labels, smallest margin first",
            _set_size,
        ),
    )
}
DEFAULT_STRATEGY = "diverse_margin"

Strategy = Enum("Strategy", {name.upper(): name for name in STRATEGIES}, type=str)  # type: ignore[misc]
Strategy.__doc__ = "How images to label next are chosen.\n\n" + "\n".join(
    f"- {s.name}: {s.description}" for s in STRATEGIES.values()
)


def get_strategy(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InvalidInput(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


def suggest(
    pool_x: Tensor,
    pool_probs: Tensor,
    labelled_x: Tensor,
    count: int,
    *,
    strategy: str = DEFAULT_STRATEGY,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    set_threshold: float | None = None,
) -> list[Suggestion]:
    """Up to ``count`` pool images to label next, best first, none a near-duplicate of another or of a labelled one.

    ``pool_x`` [P, D]: the unlabelled images' pooled embeddings; ``pool_probs``
    [P, C]: the head's probabilities for them; ``labelled_x`` [L, D] (L may be
    0): the embeddings of the images it was trained on; ``classes``: C names for
    the reasons; ``set_threshold``: the head's conformal threshold on 1 - p (what
    ``set_size`` ranks by; None: the head has no calibration). The same inputs
    and seed give the same answer.
    """
    spec = get_strategy(strategy)
    _check(pool_x, pool_probs, labelled_x, count, classes)
    top2 = pool_probs.double().topk(2, dim=1)
    pool = _Pool(
        z=F.normalize(pool_x.float(), dim=1),
        labelled=F.normalize(labelled_x.float(), dim=1),
        margin=(top2.values[:, 0] - top2.values[:, 1]).float(),
        first=top2.indices[:, 0],
        second=top2.indices[:, 1],
        classes=classes,
        num_classes=pool_probs.shape[1],
        set_size=None
        if set_threshold is None
        else ((1 - pool_probs.double()) <= set_threshold).sum(dim=1).clamp(min=1),
    )
    generator = torch.Generator().manual_seed(seed)
    picks = spec.rank(pool, count, generator)
    kept = _distinct(pool, picks, count)
    return [
        Suggestion(
            index=p.index,
            score=p.score,
            margin=float(pool.margin[p.index]),
            cluster=p.cluster,
            reason=f"{pool.confusion(p.index)}; {p.note}",
        )
        for p in kept
    ]


def _set_sizes(probs: Tensor, threshold: float) -> Tensor:
    """Labels in each row's conformal set: those whose 1 - p passes the threshold, and always the likeliest
    (adapters/calibration.py's prediction_set)."""
    return ((1 - probs.double()) <= threshold).sum(dim=1).clamp(min=1)


def _check(pool_x: Tensor, pool_probs: Tensor, labelled_x: Tensor, count: int, classes: Sequence[str] | None) -> None:
    if count < 1:
        raise InvalidInput(f"count must be at least 1, got {count}")
    if pool_x.ndim != 2 or pool_x.shape[0] == 0:
        raise InvalidInput(f"pool_x must be [P, D] with P >= 1, got {list(pool_x.shape)}")
    if pool_probs.ndim != 2 or pool_probs.shape[0] != pool_x.shape[0] or pool_probs.shape[1] < 2:
        raise InvalidInput(
            f"pool_probs must be [{pool_x.shape[0]}, C] with C >= 2 (one row per pool image), "
            f"got {list(pool_probs.shape)}"
        )
    if labelled_x.ndim != 2 or labelled_x.shape[1] != pool_x.shape[1]:
        raise InvalidInput(
            f"labelled_x must be [L, {pool_x.shape[1]}] like pool_x's embeddings, got {list(labelled_x.shape)}"
        )
    for name, t in (("pool_x", pool_x), ("pool_probs", pool_probs), ("labelled_x", labelled_x)):
        if not torch.isfinite(t).all():
            raise InvalidInput(f"{name} holds NaN or infinite values")
    sums = pool_probs.double().sum(dim=1)
    if (pool_probs < 0).any() or ((sums - 1).abs() > PROBABILITY_SLACK).any():
        raise InvalidInput("pool_probs rows must be probabilities (non-negative, summing to 1): softmax the logits")
    if classes is not None and len(classes) != pool_probs.shape[1]:
        raise InvalidInput(f"{len(classes)} class names given for {pool_probs.shape[1]} classes")


def _distinct(pool: _Pool, picks: list[_Pick], count: int) -> list[_Pick]:
    """The first ``count`` picks that are neither near-duplicates of a labelled image nor of an earlier pick."""
    near = _duplicate_distance(pool.z)
    kept: list[_Pick] = []
    rows = pool.z[:0]
    for start in range(0, len(picks), 4 * count):  # a strategy's long tail of picks is rarely reached
        block = picks[start : start + 4 * count]
        z = pool.z[[p.index for p in block]]
        for pick, row, gap in zip(block, z, _nearest(z, pool.labelled).tolist(), strict=True):
            if gap > near and float(_nearest(row[None], rows)) > near:
                kept.append(pick)
                rows = torch.cat([rows, row[None]])
                if len(kept) == count:
                    return kept
    return kept


def _nearest(a: Tensor, b: Tensor) -> Tensor:
    """Each row of a's distance to its nearest row of b (infinite where b has none)."""
    if len(b) == 0:
        return torch.full((len(a),), float("inf"))
    return torch.cdist(a, b).min(dim=1).values


def _duplicate_distance(z: Tensor) -> float:
    """DUPLICATE_FRACTION of the median distance from a pool image to its nearest other, from evenly spaced rows."""
    if len(z) < 2:
        return 0.0
    sample = torch.linspace(0, len(z) - 1, min(len(z), 64)).long()
    nearest = torch.cdist(z[sample], z).topk(2, dim=1, largest=False).values[:, 1]
    return DUPLICATE_FRACTION * float(nearest.median())


def _principal(z: Tensor, generator: torch.Generator) -> Tensor:
    """z [P, D] centred and projected on its AXES leading principal axes, by a randomised range finder with two
    power steps over at most AXES_ROWS evenly spaced rows (torch.pca_lowrank draws from the global generator)."""
    centred = z - z.mean(dim=0)
    q = min(AXES, *z.shape)
    rows = centred[torch.linspace(0, len(z) - 1, min(len(z), AXES_ROWS)).long()]
    basis = torch.linalg.qr(rows.T @ (rows @ torch.randn(z.shape[1], q, generator=generator))).Q
    for _ in range(2):
        basis = torch.linalg.qr(rows.T @ (rows @ basis)).Q
    return centred @ basis


def _typicality(candidates: Tensor, z: Tensor) -> Tensor:
    """Inverse mean distance of each candidate to its NEIGHBOURS nearest pool images (itself left out): large
    where the pool is dense, so a label there stands for many images."""
    k = min(NEIGHBOURS, len(z) - 1)
    if k == 0:
        return torch.ones(len(candidates))
    distances = torch.cdist(candidates, z).topk(k + 1, dim=1, largest=False).values[:, 1:]
    return 1 / (distances.mean(dim=1) + 1e-6)


def _kmeans(z: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """The group of each row of z [M, D] among k, by k-means++ seeding then KMEANS_STEPS Lloyd steps."""
    seeds = [int(torch.randint(len(z), (1,), generator=generator))]
    gap = ((z - z[seeds[0]]) ** 2).sum(dim=1)
    for _ in range(k - 1):
        i = int(torch.multinomial(gap / gap.sum(), 1, generator=generator)) if gap.sum() > 0 else int(gap.argmax())
        seeds.append(i)
        gap = torch.minimum(gap, ((z - z[i]) ** 2).sum(dim=1))
    centres = z[seeds].clone()
    for _ in range(KMEANS_STEPS):
        groups = torch.cdist(z, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, groups, z)
        sizes = torch.bincount(groups, minlength=k)
        filled = sizes > 0
        centres[filled] = sums[filled] / sizes[filled, None]
    return torch.cdist(z, centres).argmin(dim=1)
