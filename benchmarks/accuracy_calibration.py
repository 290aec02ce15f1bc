"""Calibrated scores and conformal prediction sets of a linear head, on images it never saw.

The Fashion-MNIST 2k/2k split of benchmarks/accuracy.py (200 train and 200 test
images per class, stratified, seed 0). graft trains a linear head on MobileNetV2
features with its default search, fits the temperature and stores the hold-out's
nonconformity scores (adapters/calibration.py); every number below is measured
on the 2,000 test images:

- ``ece_before`` / ``ece_after``: expected calibration error (15 bins) of the raw
  softmax and of the temperature-scaled scores graft serves;
- ``coverage_at_0.9``: how often the prediction set asked for with coverage 0.9
  holds the true label, and ``mean_set_size`` its mean number of labels.

    python benchmarks/accuracy_calibration.py        # prints one JSON object last
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from adapters.calibration import Calibration, prediction_set
from adapters.kinds import HeadConfig, load_head
from adapters.metrics import calibration_error
from harness.sample_data import fashion_mnist_pngs
from service.config import Settings
from service.core import Core
from service.store.heads import HeadVersionInfo
from service.training import TrainRequest

TENANT = "bench"
COVERAGE = 0.9


def measure_calibration(core: Core, train_id: str, test_id: str) -> dict[str, float | int]:
    """Train a linear head on ``train_id``; its calibration and 90 % prediction sets on ``test_id``."""
    version = core.trainer.train(TENANT, TrainRequest(dataset_id=train_id, head_name="fmnist-calibrated"))
    return calibration_on(core, version, test_id)


def calibration_on(core: Core, version: HeadVersionInfo, test_id: str) -> dict[str, float | int]:
    """A stored version's calibration error, before and after, and its 90 % sets, on ``test_id``'s images."""
    config = HeadConfig.model_validate(version.config)
    calibration = config.calibration
    assert calibration is not None  # every head graft trains now is calibrated
    backbone = core.backbones[version.backbone]
    examples = core.datasets.examples(TENANT, test_id)
    labels = torch.tensor([version.classes.index(label) for _, label in examples])
    features = core.extractor.features(backbone, backbone.num_blocks, [sha for sha, _ in examples])
    with torch.no_grad():
        logits = load_head(config, core.heads.load_tensors(version))(features).double()
    return {
        "ece_before": round(calibration_error(logits, labels), 4),
        "ece_after": round(calibration_error(logits / calibration.temperature, labels), 4),
        "temperature": round(calibration.temperature, 3),
        **coverage_of_sets(logits / calibration.temperature, labels, calibration, COVERAGE),
        "calibration_images": len(calibration.scores),
        "test_accuracy": round(float((logits.argmax(1) == labels).double().mean()), 4),
    }


def coverage_of_sets(
    logits: torch.Tensor, labels: torch.Tensor, calibration: Calibration, coverage: float
) -> dict[str, float]:
    """The empirical coverage and mean size of the sets graft serves for ``coverage`` (predictor.py's rule)."""
    threshold = calibration.threshold(coverage)
    sets = [prediction_set(row, threshold) for row in logits.softmax(dim=1)]
    hits = [int(label) in chosen for label, chosen in zip(labels, sets, strict=True)]
    return {
        f"coverage_at_{coverage:g}": round(sum(hits) / len(hits), 4),
        "mean_set_size": round(sum(len(chosen) for chosen in sets) / len(sets), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200, help="images per class in train and in test")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep graft's storage (and feature cache) here")
    args = parser.parse_args()

    core = Core.open(Settings(data_dir=args.data_dir or Path(tempfile.mkdtemp(prefix="graft-calibration-"))))
    datasets = {
        split: core.datasets.create(
            TENANT,
            f"fmnist-{split}",
            [
                (f"{split}/{i}.png", data, label)
                for i, (data, label) in enumerate(fashion_mnist_pngs(split, args.per_class))
            ],
        )
        for split in ("train", "test")
    }
    result = measure_calibration(core, datasets["train"].id, datasets["test"].id)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
