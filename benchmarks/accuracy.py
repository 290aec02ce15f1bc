"""Accuracy of graft's adapters on Fashion-MNIST and textiles, against scikit-learn on the same features.

2,000 train / 2,000 test images (200 per class, stratified, from the official
splits). graft trains each adapter kind with its default request. The
reference is what a careful practitioner would fit first: scikit-learn's plain
LogisticRegression on the same pooled features (no scaling, no class weights),
its C chosen by stratified 5-fold cross-validation on the training split
(LogisticRegressionCV, its default 10 values of C), so the comparison isolates
graft's recipe.

Backbones: linear heads on MobileNetV2, on EfficientNet-Lite2 and with
``backbone: "auto"`` (graft's cross-validated choice), each against the
reference on its own features, on the same Fashion-MNIST split and on 300 train
/ 300 test textile images (stratified, seed 0); then, because one 300-image
test split is too small to rank them, on 10 random 300-image textile training
sets, each tested on the other 1,700 images, where every auto-kind candidate
(prototype, linear, mlp) and ``kind: "auto"`` are trained too (MobileNetV2).

Beyond a classifier (same Fashion-MNIST split): 5-shot prototype heads and
``kind: "auto"`` (accuracy_fewshot.py), calibration and 90 % prediction sets
of the linear head (accuracy_calibration.py), its ONNX file against graft's own
answers (accuracy_export.py), and the label audit with 5 % of the training
labels flipped (accuracy_audit.py). Each of those scripts also runs alone.

    python benchmarks/accuracy.py            # prints one JSON object last
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accuracy_audit import measure_audit
from accuracy_calibration import calibration_on
from accuracy_export import measure_export
from accuracy_fewshot import measure_fewshot
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, train_test_split

from adapters.kinds import HeadConfig, HeadKind, get_kind, load_head
from adapters.trainer import ProgressEvent
from harness.sample_data import fashion_mnist_pngs, textile_files
from service.config import Settings
from service.core import Core
from service.kind_choice import auto_candidates
from service.training import TrainRequest

TENANT = "bench"
# Tenant policy, lifted: every run adds datasets and head versions, and --data-dir keeps them for the next run.
QUOTAS = {
    "quota_datasets": 100_000,
    "quota_heads": 100_000,
    "quota_head_versions": 100_000,
    "quota_stored_bytes": 1 << 40,
    "quota_feature_bytes": 1 << 40,
}


def sklearn_reference_accuracy(x_train, y_train, x_test, y_test) -> tuple[float, float]:
    """Plain logistic regression (no scaling, no class weights), C by stratified 5-fold CV: its test accuracy and C."""
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    model = LogisticRegressionCV(Cs=10, cv=folds, scoring="accuracy", max_iter=5000, l1_ratios=(0.0,))
    model.fit(x_train, y_train)
    return float(model.score(x_test, y_test)), float(model.C_[0])


def head_accuracy(core: Core, version, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    backbone = core.backbones[version.backbone]
    tail = backbone.fresh_tail(version.split_point) if get_kind(version.kind).copies_tail else None
    head = load_head(HeadConfig.model_validate(version.config), core.heads.load_tensors(version), tail)
    with torch.no_grad():
        predictions = head(x_test).argmax(1)
    return float((predictions == y_test).float().mean())


BACKBONE_KEYS = {"mobilenet_v2": "mobilenet", "efficientnet_lite2": "effnet", "auto": "auto"}


def compare_backbones(core: Core, name: str, train_items: list, test_items: list) -> dict:
    """Linear heads on each backbone and on `auto`, each scored on the test images through its own backbone.

    Keys: ``{mobilenet,effnet,auto}_acc``, ``{mobilenet,effnet}_sklearn_acc`` and
    ``{mobilenet,effnet}_minus_sklearn_points`` (the reference on the same
    features), ``auto_backbone``, ``auto_reason``, ``auto_minus_best_points``
    and ``cv_gap_points`` (EfficientNet-Lite2 minus MobileNetV2 in `auto`'s own
    cross-validation).
    """
    train = core.datasets.create(TENANT, f"{name}-train", train_items)
    test = core.datasets.create(TENANT, f"{name}-test", test_items)
    class_index = {label: i for i, label in enumerate(train.classes)}
    test_examples = core.datasets.examples(TENANT, test.id)
    train_examples = core.datasets.examples(TENANT, train.id)
    y_test = torch.tensor([class_index[label] for _, label in test_examples])
    y_train = np.array([class_index[label] for _, label in train_examples])
    result: dict = {}
    for backbone, key in BACKBONE_KEYS.items():
        request = TrainRequest(dataset_id=train.id, head_name=f"{name}-{key}", backbone=backbone)

        def report(event: ProgressEvent, arm: str = backbone) -> None:
            print(f"  {name} {arm} {event.message}", file=sys.stderr)

        version = core.trainer.train(TENANT, request, progress=report)
        trunk = core.backbones[version.backbone]
        x_test = core.extractor.features(trunk, trunk.num_blocks, [sha for sha, _ in test_examples])
        result[f"{key}_acc"] = round(head_accuracy(core, version, x_test, y_test), 4)
        print(f"{name} {backbone}: {result[f'{key}_acc']} ({version.backbone})", file=sys.stderr)
        if backbone != "auto":
            x_train = core.extractor.features(trunk, trunk.num_blocks, [sha for sha, _ in train_examples])
            reference, c = sklearn_reference_accuracy(x_train.numpy(), y_train, x_test.numpy(), y_test.numpy())
            result[f"{key}_sklearn_acc"] = round(reference, 4)
            result[f"{key}_minus_sklearn_points"] = round(100 * (result[f"{key}_acc"] - reference), 2)
            print(f"{name} {backbone}: reference {reference:.4f} (C={c:.3g})", file=sys.stderr)
        if backbone == "auto":
            choice = version.metrics["backbone_choice"]
            result["auto_backbone"] = version.backbone
            result["auto_reason"] = choice["reason"]
            folds = {arm: np.asarray(score["folds"]) for arm, score in choice["scores"].items()}
            gap = float(np.mean(folds["efficientnet_lite2"] - folds["mobilenet_v2"]))
            result["cv_gap_points"] = round(100 * gap, 2)
    best = max(result["mobilenet_acc"], result["effnet_acc"])
    result["auto_minus_best_points"] = round(100 * (result["auto_acc"] - best), 2)
    return result


def backbone_comparison(core: Core, prefix: str, train_items: list, test_items: list) -> dict:
    """`compare_backbones` with its keys named ``{prefix}_...``, as the JSON reports them."""
    return {f"{prefix}_{key}": value for key, value in compare_backbones(core, prefix, train_items, test_items).items()}


def compare_kinds(core: Core, name: str, train_items: list, test_items: list, linear_acc: float) -> dict:
    """Every candidate of ``kind: "auto"`` trained alone, and auto itself, on MobileNetV2: ``{kind}_acc``."""
    train = core.datasets.create(TENANT, f"{name}-train", train_items)
    test = core.datasets.create(TENANT, f"{name}-test", test_items)
    class_index = {label: i for i, label in enumerate(train.classes)}
    test_examples = core.datasets.examples(TENANT, test.id)
    y_test = torch.tensor([class_index[label] for _, label in test_examples])
    trunk = core.backbones["mobilenet_v2"]
    x_test = core.extractor.features(trunk, trunk.num_blocks, [sha for sha, _ in test_examples])
    result = {"linear_acc": linear_acc}
    for kind in [*(k.value for k in auto_candidates(opt_in=False) if k.value != "linear"), "auto"]:
        request = TrainRequest(dataset_id=train.id, head_name=f"{name}-kind-{kind}", backbone="mobilenet_v2", kind=kind)
        version = core.trainer.train(TENANT, request)
        result[f"{kind}_acc"] = round(head_accuracy(core, version, x_test, y_test), 4)
        if kind == "auto":
            result["auto_kind"] = version.kind
        print(f"{name} kind {kind}: {result[f'{kind}_acc']} ({version.kind})", file=sys.stderr)
    return result


def textile_over_splits(core: Core, splits: int) -> dict:
    """The textile comparison over ``splits`` random 300-image training sets, each tested on the other 1,700.

    One 300-image test split cannot rank two backbones whose gap is about a
    point (the standard error of a paired difference on 300 images is about 3
    points), so this reports what a user can expect: mean accuracy per arm,
    how often `auto` picked each backbone, and whether `auto`'s cross-validated
    gap predicts the gap on the held-out images (their correlation).
    """
    files = textile_files(10_000)
    labels = [label for _, _, label in files]
    runs, kinds = [], []
    for seed in range(splits):
        train, test = train_test_split(files, train_size=300, stratify=labels, random_state=seed)
        runs.append(compare_backbones(core, f"textile-split{seed}", train, test))
        kinds.append(compare_kinds(core, f"textile-split{seed}", train, test, runs[-1]["mobilenet_acc"]))
    mean = {key: float(np.mean([run[f"{key}_acc"] for run in runs])) for key in ("mobilenet", "effnet", "auto")}
    kind_mean = {
        key.removesuffix("_acc"): float(np.mean([run[key] for run in kinds]))
        for key in kinds[0]
        if key.endswith("_acc")
    }
    best_kind = max(kind_mean[kind.value] for kind in auto_candidates(opt_in=False))
    versus_sklearn = {key: [run[f"{key}_minus_sklearn_points"] for run in runs] for key in ("mobilenet", "effnet")}
    test_gaps = [100 * (run["effnet_acc"] - run["mobilenet_acc"]) for run in runs]
    cv_gaps = [run["cv_gap_points"] for run in runs]
    picks = sum(run["auto_backbone"] == "efficientnet_lite2" for run in runs)
    best = max(mean["mobilenet"], mean["effnet"])
    return {
        "textile_splits": splits,
        **{f"textile_splits_{key}_acc_mean": round(value, 4) for key, value in mean.items()},
        "textile_splits_auto_minus_best_mean_points": round(100 * (mean["auto"] - best), 2),
        **{
            f"textile_splits_linear_minus_sklearn_{stat}_points_{key}": round(float(reduce(gaps)), 2)
            for key, gaps in versus_sklearn.items()
            for stat, reduce in (("mean", np.mean), ("worst", np.min))
        },
        **{f"textile_splits_kind_{kind}_acc_mean": round(value, 4) for kind, value in kind_mean.items()},
        "textile_splits_auto_kind_minus_best_kind_mean_points": round(100 * (kind_mean["auto"] - best_kind), 2),
        "textile_splits_auto_kinds": [run["auto_kind"] for run in kinds],
        "textile_splits_auto_picks_effnet": f"{picks}/{splits}",
        "textile_splits_effnet_gap_points": [round(gap, 1) for gap in test_gaps],
        "textile_splits_cv_gap_points": cv_gaps,
        "textile_splits_cv_test_gap_corr": round(float(np.corrcoef(cv_gaps, test_gaps)[0, 1]), 3),
    }


def textile_split(train_size: int, test_size: int, seed: int) -> tuple[list, list]:
    """Disjoint train and test textile images, stratified by class."""
    files = textile_files(10_000)
    return train_test_split(
        files, train_size=train_size, test_size=test_size, stratify=[label for _, _, label in files], random_state=seed
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200, help="images per class in train and in test")
    parser.add_argument(
        "--kinds", default="linear,mlp,finetune", help="head kinds on MobileNetV2; '' for the backbone runs only"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="keep graft's storage (and feature cache) here")
    parser.add_argument(
        "--no-backbones", action="store_true", help="skip the MobileNetV2 / EfficientNet-Lite2 / auto runs"
    )
    parser.add_argument(
        "--textile-splits", type=int, default=10, help="random textile training sets to average over (0: none)"
    )
    parser.add_argument(
        "--no-extras", action="store_true", help="skip few-shot, kind auto, calibration, ONNX and label audit"
    )
    args = parser.parse_args()

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="graft-accuracy-"))
    core = Core.open(Settings(data_dir=data_dir, **QUOTAS))
    backbone = core.backbones["mobilenet_v2"]
    train_files = fashion_mnist_pngs("train", args.per_class, seed=0)
    test_files = fashion_mnist_pngs("test", args.per_class, seed=0)
    train = core.datasets.create(
        TENANT, "fmnist-train", [(f"train/{i}.png", data, label) for i, (data, label) in enumerate(train_files)]
    )
    test = core.datasets.create(
        TENANT, "fmnist-test", [(f"test/{i}.png", data, label) for i, (data, label) in enumerate(test_files)]
    )
    class_index = {name: i for i, name in enumerate(train.classes)}
    test_examples = core.datasets.examples(TENANT, test.id)
    y_test = torch.tensor([class_index[label] for _, label in test_examples])
    test_shas = [sha for sha, _ in test_examples]

    result: dict[str, float | int | str] = {"train_images": len(train_files), "test_images": len(test_files)}
    timings = {}
    versions = {}
    for kind in filter(None, args.kinds.split(",")):
        request = TrainRequest(dataset_id=train.id, head_name=f"fmnist-{kind}", kind=HeadKind(kind))
        started = time.perf_counter()
        version = core.trainer.train(
            TENANT,
            request,
            progress=lambda e, kind=kind: print(f"  {kind} {e.phase} {e.fraction:.2f} {e.message}", file=sys.stderr),
        )
        timings[f"{kind}_train_s"] = round(time.perf_counter() - started, 1)
        versions[kind] = version
        x_test = core.extractor.features(backbone, version.split_point, test_shas)
        result[f"{kind}_acc"] = round(head_accuracy(core, version, x_test, y_test), 4)
        result[f"{kind}_hyperparams"] = json.dumps(version.hyperparams, sort_keys=True)
        print(f"{kind}: {result[f'{kind}_acc']}", file=sys.stderr)

    if "linear" in args.kinds:
        train_examples = core.datasets.examples(TENANT, train.id)
        y_train = np.array([class_index[label] for _, label in train_examples])
        x_train = core.extractor.features(backbone, backbone.num_blocks, [sha for sha, _ in train_examples]).numpy()
        x_test = core.extractor.features(backbone, backbone.num_blocks, test_shas).numpy()
        acc, c = sklearn_reference_accuracy(x_train, y_train, x_test, y_test.numpy())
        result["sklearn_logreg_acc"] = round(acc, 4)
        result["sklearn_logreg_C"] = c
        result["linear_minus_sklearn_points"] = round(100 * (result["linear_acc"] - acc), 2)
        result["linear_recipe"] = json.dumps(versions["linear"].metrics["recipe"]["chosen"], sort_keys=True)
    if "finetune" in args.kinds and "linear" in args.kinds:
        result["finetune_minus_linear_points"] = round(100 * (result["finetune_acc"] - result["linear_acc"]), 2)
    if not args.no_extras:
        kind_acc = {kind: float(result[f"{kind}_acc"]) for kind in ("linear", "mlp") if kind in versions}
        result.update(measure_fewshot(core, train, test, kind_acc=kind_acc))
        result["fashion_auto_kind_minus_best_kind_points"] = result["auto_minus_best_kind_points"]
        if "linear" in versions:  # the linear head above, not a second one
            result.update(calibration_on(core, versions["linear"], test.id))
            result.update(measure_export(core, train.id, test.id, head="fmnist-linear"))
        result.update(measure_audit(core, per_class=args.per_class))
    if not args.no_backbones:
        fashion = [
            [
                (f"{split}/{i}.png", data, label)
                for i, (data, label) in enumerate(fashion_mnist_pngs(split, args.per_class, 0))
            ]
            for split in ("train", "test")
        ]
        result.update(backbone_comparison(core, "textile", *textile_split(300, 300, seed=0)))
        result.update(backbone_comparison(core, "fashion", *fashion))
        for key in ("mobilenet", "effnet"):
            result[f"fashion_linear_minus_sklearn_points_{key}"] = result[f"fashion_{key}_minus_sklearn_points"]
        if args.textile_splits:
            result.update(textile_over_splits(core, args.textile_splits))
    result.update(timings)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
