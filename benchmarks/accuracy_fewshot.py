"""Instant heads on Fashion-MNIST: prototype heads from 5 images per class, and ``kind: "auto"``.

On the 2,000 train / 2,000 test split of benchmarks/accuracy.py (200 per class,
stratified, from the official splits), with MobileNetV2's pooled features:

* ``prototype_acc_5shot``: the mean test accuracy over 10 random draws of 5
  training images per class, each a prototype head fit on those 50 images'
  cached features by the same code the trainer runs (adapters/prototype.py).
  All 5 images train the head: at 5 shots a hold-out would cost a fifth of them.
* ``auto_kind_acc``: the test accuracy of the head ``kind: "auto"`` keeps,
  beside each kind's own (``kind_acc_<kind>``, each trained alone by the same
  recipe), so ``auto_minus_best_kind_points`` says what choosing on the
  hold-out costs against knowing the best kind in advance.

    python benchmarks/accuracy_fewshot.py            # prints one JSON object last
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapters.heads import PrototypeHead
from adapters.kinds import HeadConfig, load_head
from adapters.prototype import fit_prototype
from harness.sample_data import fashion_mnist_pngs
from service.config import Settings
from service.core import Core
from service.kind_choice import auto_candidates
from service.store.datasets import DatasetInfo
from service.training import TrainRequest

TENANT = "bench"
# Generous: the benchmark compares every kind; the service's default is 60 s.
AUTO_TIME_BUDGET_S = 1800.0


def pooled(core: Core, dataset: DatasetInfo, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset's pooled MobileNetV2 features (through the feature cache) and its labels as class ids."""
    backbone = core.backbones["mobilenet_v2"]
    examples = core.datasets.examples(TENANT, dataset.id)
    index = {name: i for i, name in enumerate(classes)}
    x = core.extractor.features(backbone, backbone.num_blocks, [sha for sha, _ in examples])
    return x.float(), torch.tensor([index[label] for _, label in examples])


def test_accuracy(core: Core, version, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    head = load_head(HeadConfig.model_validate(version.config), core.heads.load_tensors(version))
    with torch.no_grad():
        return float((head(x_test).argmax(1) == y_test).float().mean())


def prototype_draws(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    shots: int,
    draws: int,
    seed: int,
) -> tuple[list[float], float]:
    """Per draw, test accuracy of a prototype head on ``shots`` random training images per class; the slowest fit."""
    rng = np.random.default_rng(seed)
    labels = y_train.numpy()
    num_classes = int(labels.max()) + 1
    accuracies, slowest = [], 0.0
    for _ in range(draws):
        chosen = np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), size=shots, replace=False) for c in range(num_classes)]
        )
        head = PrototypeHead(x_train.shape[1], num_classes)
        started = time.perf_counter()
        fit_prototype(head, x_train[chosen], y_train[chosen])
        slowest = max(slowest, time.perf_counter() - started)
        with torch.no_grad():
            accuracies.append(float((head(x_test).argmax(1) == y_test).float().mean()))
    return accuracies, slowest


def measure_fewshot(
    core: Core,
    train: DatasetInfo,
    test: DatasetInfo,
    *,
    shots: int = 5,
    draws: int = 10,
    seed: int = 0,
    kind_acc: dict[str, float] | None = None,
) -> dict[str, float | str]:
    """``prototype_acc_5shot`` and ``auto_kind_acc`` (with every kind's own accuracy) on ``train`` / ``test``.

    ``kind_acc`` takes test accuracies the caller already measured with the
    same default requests (accuracy.py's ``linear_acc`` and ``mlp_acc``), so
    that those kinds are not trained twice.
    """
    x_train, y_train = pooled(core, train, train.classes)
    x_test, y_test = pooled(core, test, train.classes)
    accuracies, slowest = prototype_draws(x_train, y_train, x_test, y_test, shots, draws, seed)
    result: dict[str, float | str] = {
        f"prototype_acc_{shots}shot": round(float(np.mean(accuracies)), 4),
        f"prototype_acc_{shots}shot_std": round(float(np.std(accuracies)), 4),
        "prototype_fit_ms_max": round(1000 * slowest, 2),
    }
    print(f"prototype {shots}-shot over {draws} draws: {accuracies}", file=sys.stderr)

    for kind in auto_candidates(opt_in=False):
        if kind.value in (kind_acc or {}):
            result[f"kind_acc_{kind.value}"] = (kind_acc or {})[kind.value]
            continue
        started = time.perf_counter()
        version = core.trainer.train(
            TENANT, TrainRequest(dataset_id=train.id, head_name=f"few-{kind.value}", kind=kind)
        )
        result[f"kind_acc_{kind.value}"] = round(test_accuracy(core, version, x_test, y_test), 4)
        result[f"kind_train_s_{kind.value}"] = round(time.perf_counter() - started, 2)
        print(f"{kind.value}: test {result[f'kind_acc_{kind.value}']}", file=sys.stderr)

    request = TrainRequest(dataset_id=train.id, head_name="few-auto", kind="auto", time_budget_s=AUTO_TIME_BUDGET_S)
    version = core.trainer.train(TENANT, request)
    result["auto_kind_acc"] = round(test_accuracy(core, version, x_test, y_test), 4)
    result["auto_kind"] = version.kind
    result["auto_kind_reason"] = version.metrics["kind_choice"]["reason"]
    best = max(float(result[f"kind_acc_{kind.value}"]) for kind in auto_candidates(opt_in=False))
    result["auto_minus_best_kind_points"] = round(100 * (float(result["auto_kind_acc"]) - best), 2)
    print(f"auto: {version.kind}, test {result['auto_kind_acc']} ({result['auto_kind_reason']})", file=sys.stderr)
    return result


def fashion_datasets(core: Core, per_class: int) -> tuple[DatasetInfo, DatasetInfo]:
    """The Fashion-MNIST train and test datasets of benchmarks/accuracy.py (same images, same names)."""
    made = []
    for split in ("train", "test"):
        files = fashion_mnist_pngs(split, per_class, seed=0)
        examples = [(f"{split}/{i}.png", data, label) for i, (data, label) in enumerate(files)]
        made.append(core.datasets.create(TENANT, f"fmnist-{split}", examples))
    return made[0], made[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200, help="images per class in train and in test")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep graft's storage (and feature cache) here")
    args = parser.parse_args()
    core = Core.open(Settings(data_dir=args.data_dir or Path(tempfile.mkdtemp(prefix="graft-fewshot-"))))
    train, test = fashion_datasets(core, args.per_class)
    print(json.dumps(measure_fewshot(core, train, test)))


if __name__ == "__main__":
    main()
