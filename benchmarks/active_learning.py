"""What to label next: learning curves of labels chosen by ``:suggest`` against labels chosen at random.

A pool of unlabelled images (Fashion-MNIST: 4,000 training images; the textile
set: half its images) starts with 2 labelled images per class. Each round trains
a linear head on what is labelled (graft's own training: the recipe search,
calibration, everything a job does), measures its accuracy on held-out test
images (Fashion-MNIST: 2,000 test images; textile: the other half), and labels
20 more pool images: the ones graft suggests for that head (the default
diverse_margin strategy, through the same ExampleSuggester the SuggestExamples
RPC calls), or 20 drawn at random. The oracle gives the true label. Same budget,
same starting labels, 5 seeds.

    python benchmarks/active_learning.py                 # prints one JSON object last; draws the curves
    python benchmarks/active_learning.py --seeds 1 --datasets fashion   # a quick look

``suggest_minus_random_acc_at_round_8``: mean over seeds of the accuracy gap
(points) after the last round; ``suggest_minus_random_area_points``: the mean
gap over rounds 0 to 8. The test features and the pool's are cached after the
first seed, so later seeds cost only training and ranking.
"""

import argparse
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adapters.active import DEFAULT_STRATEGY
from adapters.kinds import HeadKind
from harness.sample_data import FASHION_MNIST_CLASSES, fashion_mnist_arrays, textile_dir
from service.config import Settings
from service.core import Core
from service.engine.head_cache import materialise
from service.store.labels import LabelUpdate
from service.suggestions import SuggestRequest, head_probabilities
from service.training import TrainRequest

TENANT = "bench"
BACKBONE = "mobilenet_v2"
RESULTS = Path(__file__).parent / "results"
# Tenant policy, lifted: every round stores a head version, every arm and seed a dataset.
QUOTAS = {"quota_datasets": 100_000, "quota_heads": 100_000, "quota_head_versions": 100_000}


@dataclass(frozen=True)
class LabelledImages:
    """Images as (file name, encoded bytes) with their true labels."""

    files: list[tuple[str, bytes]]
    labels: list[str]


@dataclass(frozen=True)
class Task:
    name: str
    pool: LabelledImages
    test: LabelledImages


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def fashion_task(pool_size: int, test_size: int) -> Task:
    """A random pool from the training split, a random test set from the test split (fixed draws)."""
    rng = np.random.default_rng(0)
    parts = []
    for split, size in (("train", pool_size), ("test", test_size)):
        images, labels = fashion_mnist_arrays(split)
        chosen = np.sort(rng.choice(len(labels), size, replace=False))
        parts.append(
            LabelledImages(
                [(f"{split}/{i}.png", _png(images[i])) for i in chosen],
                [FASHION_MNIST_CLASSES[labels[i]] for i in chosen],
            )
        )
    return Task("fashion", *parts)


def textile_task(pool_size: int, test_size: int) -> Task:
    """The textile set shuffled once: the pool from its first half, the test images from its second."""
    paths = sorted(textile_dir().glob("*/*.jpg"))
    order = np.random.default_rng(0).permutation(len(paths))
    half = len(paths) // 2
    parts = []
    for chosen in (order[:half][:pool_size], order[half:][:test_size]):
        picked = [paths[i] for i in sorted(chosen)]
        parts.append(
            LabelledImages(
                [(f"{p.parent.name}/{p.name}", p.read_bytes()) for p in picked], [p.parent.name for p in picked]
            )
        )
    return Task("textile", *parts)


def starting_labels(labels: list[str], per_class: int, seed: int) -> list[int]:
    """``per_class`` pool positions of each class, drawn with ``seed``: both arms of a seed start from them."""
    rng = np.random.default_rng(seed)
    array = np.array(labels)
    return sorted(int(i) for c in sorted(set(labels)) for i in rng.choice(np.flatnonzero(array == c), per_class, False))


class Evaluator:
    """Accuracy of a head version on the task's test images, from their cached features."""

    def __init__(self, core: Core, test: LabelledImages) -> None:
        self.core = core
        self.backbone = core.backbones[BACKBONE]
        examples = [(name, data, label) for (name, data), label in zip(test.files, test.labels, strict=True)]
        stored = core.datasets.create(TENANT, "al-test", examples)
        shas = [e.image_sha256 for e in core.datasets.labelled_examples(TENANT, stored.id)]
        self.features = core.extractor.features(self.backbone, self.backbone.num_blocks, shas, tenant=TENANT)
        self.labels = test.labels

    def accuracy(self, head_ref: str) -> float:
        version = self.core.heads.resolve(TENANT, head_ref)
        head = materialise(version, self.core.heads.load_tensors(version), self.backbone)
        probabilities = head_probabilities(head, self.features, self.backbone.placement.device)
        predicted = [head.classes[i] for i in probabilities.argmax(dim=1).tolist()]
        return float(np.mean([p == t for p, t in zip(predicted, self.labels, strict=True)]))


def run_arm(
    core: Core, task: Task, evaluator: Evaluator, seed: int, arm: str, rounds: int, per_round: int
) -> list[float]:
    """Accuracy after each round 0..rounds of one arm: train, test, choose, label."""
    truth = task.pool.labels
    start = set(starting_labels(truth, 2, seed))
    examples = [(name, data, truth[i] if i in start else None) for i, (name, data) in enumerate(task.pool.files)]
    dataset = core.datasets.create(TENANT, f"al-{task.name}-{arm}-{seed}", examples)
    head = f"al-{task.name}-{arm}-{seed}"
    rng = np.random.default_rng(1000 + seed)
    curve = []
    for round_ in range(rounds + 1):
        version = core.trainer.train(
            TENANT, TrainRequest(dataset_id=dataset.id, head_name=head, kind=HeadKind("linear"), seed=seed)
        )
        curve.append(evaluator.accuracy(f"{head}@{version.version}"))
        if round_ == rounds:
            break
        if arm == "suggest":
            found = core.suggester.suggest(
                TENANT, SuggestRequest(dataset_id=dataset.id, head=f"{head}@{version.version}", count=per_round)
            )
            chosen = [s.example.index for s in found.suggestions]
        else:
            pool = [e.index for e in core.datasets.unlabelled_examples(TENANT, dataset.id)]
            chosen = sorted(int(i) for i in rng.choice(pool, per_round, replace=False))
        core.labels.update(TENANT, dataset.id, [LabelUpdate(example=str(i), label=truth[i]) for i in chosen])
    return curve


def measure(core: Core, task: Task, seeds: int, rounds: int, per_round: int) -> dict:
    evaluator = Evaluator(core, task.test)
    curves: dict[str, list[list[float]]] = {"suggest": [], "random": []}
    for seed in range(seeds):
        for arm in curves:
            started = time.perf_counter()
            curves[arm].append(run_arm(core, task, evaluator, seed, arm, rounds, per_round))
            print(
                f"{task.name} seed {seed} {arm}: {[round(a, 3) for a in curves[arm][-1]]} "
                f"({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )
    suggest, random = (np.array(curves[arm]) * 100 for arm in ("suggest", "random"))
    gap = suggest - random
    return {
        "pool": len(task.pool.labels),
        "test": len(task.test.labels),
        "classes": len(set(task.pool.labels)),
        "seeds": seeds,
        "rounds": rounds,
        "labels_per_round": per_round,
        "strategy": DEFAULT_STRATEGY,
        "suggest_acc_by_round": [round(float(a), 2) for a in suggest.mean(axis=0)],
        "random_acc_by_round": [round(float(a), 2) for a in random.mean(axis=0)],
        "suggest_minus_random_acc_at_last_round": round(float(gap[:, -1].mean()), 2),
        "suggest_minus_random_area_points": round(float(gap.mean()), 2),
        "suggest_minus_random_last_round_by_seed": [round(float(g), 2) for g in gap[:, -1]],
    }


def draw(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        labelled = [result["classes"] * 2 + r * result["labels_per_round"] for r in range(result["rounds"] + 1)]
        ax.plot(labelled, result["suggest_acc_by_round"], "o-", label=f"suggest ({result['strategy']})")
        ax.plot(labelled, result["random_acc_by_round"], "s--", label="random")
        seeds = f"{result['seeds']} seed{'s' if result['seeds'] > 1 else ''}"
        ax.set_title(f"{name}: pool {result['pool']}, test {result['test']}, {seeds}")
        ax.set_xlabel("labelled images")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--datasets", default="fashion,textile", help="comma-separated: fashion, textile")
    parser.add_argument("--pool", type=int, default=4000, help="Fashion-MNIST pool size (textile: half its images)")
    parser.add_argument("--test", type=int, default=2000, help="Fashion-MNIST test images (textile: the other half)")
    parser.add_argument("--plot", type=Path, default=RESULTS / "active_learning.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    tasks = {"fashion": lambda: fashion_task(args.pool, args.test), "textile": lambda: textile_task(10**6, 10**6)}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        core = Core.open(Settings(data_dir=Path(data_dir), **QUOTAS), backbones=[BACKBONE])
        try:
            for name in args.datasets.split(","):
                results[name] = measure(core, tasks[name](), args.seeds, args.rounds, args.per_round)
        finally:
            core.db.close()
    summary: dict = {"backbone": BACKBONE, **{f"{name}": result for name, result in results.items()}}
    if "fashion" in results:
        summary["suggest_minus_random_acc_at_round_8"] = results["fashion"]["suggest_minus_random_acc_at_last_round"]
        summary["suggest_minus_random_area_points"] = results["fashion"]["suggest_minus_random_area_points"]
    draw(results, args.plot)
    summary["plot"] = str(args.plot)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
