"""What training costs the first time, on retraining, and for a hyper-parameter search.

One run, one dataset (Fashion-MNIST, 100 images per class), linear heads with
the default request (the recipe searched by k folds, then calibration and the
label audit, as every job runs them):
- first training: trunk feature extraction + the whole job;
- retraining on the same images: features come from the cache, the search's
  evidence from the head's last version (its key matches: the same features,
  labels and options), and the served refit starts at the last version's head;
  calibration, the label audit and the monitoring reference run again;
- retraining after a relabelling (the same images, 10 labels changed): features
  from the cache, the whole search again, the refit started at the last head;
- the same with one fixed recipe (a one-point search of one scaling and class weighting).

    python benchmarks/training_cost.py       # prints one JSON object last
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from adapters.kinds import HeadKind, get_kind
from adapters.search_space import SearchSpace
from harness.sample_data import fashion_mnist_pngs
from service.config import Settings
from service.core import Core
from service.training import TrainRequest

TENANT = "bench"


def timed_train(core: Core, request: TrainRequest) -> float:
    started = time.perf_counter()
    core.trainer.train(TENANT, request)
    return time.perf_counter() - started


RELABELLED = 10  # images whose label the relabelled run changes


def relabelled(files: list[tuple[bytes, str]]) -> list[tuple[str, bytes, str]]:
    """The upload after a person changed a few labels: the first RELABELLED images get the next class's name."""
    classes = sorted({label for _, label in files})
    moved = {label: classes[(i + 1) % len(classes)] for i, label in enumerate(classes)}
    return [(f"{i}.png", data, moved[label] if i < RELABELLED else label) for i, (data, label) in enumerate(files)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="graft-cost-") as tmp:
        core = Core.open(Settings(data_dir=Path(tmp)))
        files = fashion_mnist_pngs("train", args.per_class, seed=1)
        dataset = core.datasets.create(
            TENANT, "fmnist", [(f"{i}.png", data, label) for i, (data, label) in enumerate(files)]
        )
        grid = get_kind("linear").search_space
        default = TrainRequest(dataset_id=dataset.id, head_name="cost", kind=HeadKind("linear"))
        first = timed_train(core, default)
        retrain = timed_train(core, default)
        changed = core.datasets.create(TENANT, "fmnist-relabelled", relabelled(files))
        relabelled_s = timed_train(core, default.model_copy(update={"dataset_id": changed.id}))
        one_point = SearchSpace(lr=grid.lr[:1], weight_decay=grid.weight_decay[2:3])
        recipe = {"search": one_point.model_dump(), "scaling": "standardise", "class_weighting": "none"}
        fixed = TrainRequest.model_validate(default.model_dump() | recipe)
        fixed_s = timed_train(core, fixed)

    print(
        json.dumps(
            {
                "images": len(files),
                "first_train_s": round(first, 3),
                "retrain_s": round(retrain, 3),
                "retrain_relabelled_s": round(relabelled_s, 3),
                "retrain_fixed_recipe_s": round(fixed_s, 3),
                "retrain_speedup": round(first / retrain, 1),
                "relabelled_speedup": round(first / relabelled_s, 1),
                "fixed_recipe_speedup": round(first / fixed_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
