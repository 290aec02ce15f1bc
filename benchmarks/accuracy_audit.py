"""Label audit on Fashion-MNIST: recall and precision of the images graft flags when 5% of the labels are wrong.

The training split of benchmarks/accuracy.py (200 images per class, seed 0);
5% of its labels (seed 0) are flipped to a random other class before upload.
graft audits the dataset with its own rule (adapters/audit.py: Confident
Learning's per-class thresholds, nothing tuned on the flips), through the same
DatasetAuditor the AuditDataset RPC calls. Recall: flipped images flagged /
flipped images; precision: flipped images flagged / images flagged. Fashion-MNIST
has genuinely ambiguous images (shirt / T-shirt / pullover): a flagged image
whose label was not flipped counts against precision, even where its label is
arguably wrong.

    python benchmarks/accuracy_audit.py      # prints one JSON object last
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.sample_data import fashion_mnist_pngs
from service.auditing import MAX_AUDIT_ITEMS, AuditRequest
from service.config import Settings
from service.core import Core

TENANT = "bench"


def flip_labels(labels: list[str], fraction: float, seed: int) -> tuple[list[str], dict[int, str]]:
    """``labels`` with ``fraction`` of them (chosen at random) changed to a random other class; the originals."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    flipped = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    noisy = list(labels)
    for index in flipped:
        noisy[index] = str(rng.choice([c for c in classes if c != labels[index]]))
    return noisy, {int(i): labels[i] for i in flipped}


def measure_audit(core: Core, per_class: int = 200, flip_fraction: float = 0.05, seed: int = 0) -> dict:
    """Upload the split with flipped labels, audit it on mobilenet_v2, score the flags against the flips."""
    files = fashion_mnist_pngs("train", per_class, seed=0)
    noisy, original = flip_labels([label for _, label in files], flip_fraction, seed)
    examples = [(f"train/{i}.png", data, label) for i, ((data, _), label) in enumerate(zip(files, noisy, strict=True))]
    dataset = core.datasets.create(TENANT, "fmnist-audit", examples)
    request = AuditRequest(dataset_id=dataset.id, max_suspects=MAX_AUDIT_ITEMS, max_duplicates=MAX_AUDIT_ITEMS)
    started = time.perf_counter()
    audit = core.auditor.audit(TENANT, request).audit
    seconds = time.perf_counter() - started
    if audit.suspect_count > len(audit.suspects):
        raise RuntimeError(f"{audit.suspect_count} flagged, more than the {MAX_AUDIT_ITEMS} one audit lists")
    flagged = {suspect.index: suspect for suspect in audit.suspects}
    caught = [index for index in original if index in flagged]
    class_names = dataset.classes
    right_suggestion = sum(class_names[flagged[index].suggested] == original[index] for index in caught)
    return {
        "audit_images": len(files),
        "audit_flipped": len(original),
        "audit_flagged": len(flagged),
        "audit_recall": round(len(caught) / len(original), 4),
        "audit_precision": round(len(caught) / max(1, len(flagged)), 4),
        "audit_suggestion_acc": round(right_suggestion / max(1, len(caught)), 4),
        "audit_folds": audit.folds,
        "audit_weight_decay": audit.weight_decay,
        "audit_duplicate_pairs": audit.duplicate_count,
        "audit_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--flip-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="which labels are flipped, and to what")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep graft's storage (and feature cache) here")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="graft-audit-"))
    core = Core.open(Settings(data_dir=data_dir), backbones=["mobilenet_v2"])
    result = measure_audit(core, args.per_class, args.flip_fraction, args.seed)
    print(json.dumps(result, indent=2), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
