"""What training costs the first time, on retraining, and for a hyper-parameter search.

One run, one dataset (Fashion-MNIST, 100 images per class), linear heads:
- first training: trunk feature extraction + one fit (a one-configuration search);
- retraining the same configuration on the same images: features come from the cache;
- an 8-configuration search on the same images (the linear kind's default grid).

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
        one_config = SearchSpace(lr=grid.lr[:1], weight_decay=grid.weight_decay[:1])

        single = TrainRequest(dataset_id=dataset.id, head_name="cost", kind=HeadKind.LINEAR, search=one_config)
        first = timed_train(core, single)
        retrain = timed_train(core, single)
        search8 = timed_train(core, single.model_copy(update={"search": grid}))

    print(
        json.dumps(
            {
                "images": len(files),
                "search_configs": len(grid.lr) * len(grid.weight_decay),
                "first_train_s": round(first, 3),
                "retrain_s": round(retrain, 3),
                "search8_s": round(search8, 3),
                "retrain_speedup": round(first / retrain, 1),
                "search8_over_first": round(search8 / first, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
