"""The trunk runtime graft serves through, against torch and against every exact runtime a user could pick.

All in one run, rounds interleaved (each ratio taken within a round, then the median
over rounds: this shared machine drifts between rounds), on preprocessed inputs,
batches of 8, all cores:

- per backbone (MobileNetV2 at 224 px, EfficientNet-Lite2 at 260 px):
  - ``torch_eager``: the published model's blocks (real batch norms) and global
    pooling under ``torch.inference_mode()``, one call at a time on all of torch's threads;
  - ``trunk``: graft's serving trunk (the runtime it chose at start-up, see
    ``service/engine/trunk.py``), called as serving calls it: one batch of 8 per
    lane, the lanes side by side;
  - the exact candidates a user could run instead, each in the better of its two
    set-ups (one call on every thread, or one single-threaded call per core side
    by side): ONNX Runtime fp32 and OpenVINO f32 on the same exported graph, and
    ``torch.compile`` (inductor, default mode; one call on every thread: its
    compiled code is not meant to run from two threads at once);
  - ``fp32_max_abs_diff``: the serving trunk's features of 64 textile images
    against torch eager's;
- ``tuning_mobilenet_ips``: the serving runtime's MobileNetV2 trunk in each CPU
  set-up graft could serve with (micro-batch 1-8, batches side by side or one
  at a time on every core);
- MobileNetV2's engine (graft's batcher, decode excluded) with 1 linear head and
  with 1,000 heads (requests spread over them), against the serving trunk alone;
- reduced precision: the trunk with ``GRAFT_TRUNK_PRECISION=int8`` and ``bf16``
  against fp32 (``reduced_over_fp32`` is the faster one's, per backbone and the
  lower of the two), and the accuracy cost: linear heads trained by graft on each
  precision's features of the same splits, Fashion-MNIST 2,000 / 2,000 and five
  random textile 300 / 1,700 splits, their mean (MobileNetV2).

    python benchmarks/runtime.py             # prints one JSON object last
    python benchmarks/runtime.py --quick     # fewer rounds and images, no torch.compile or accuracy
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from accuracy import head_accuracy
from engine_setup import TENANT, create_linear_heads, open_core, published_trunk
from serving import engine_ips
from sklearn.model_selection import train_test_split

from harness.sample_data import fashion_mnist_pngs, textile_files
from service.core import Core
from service.engine.backbones import Backbone
from service.engine.runtimes import RUNTIMES, Lanes, Precision
from service.engine.trunk import images_per_second
from service.store.images import decode_rgb
from service.training import TrainRequest

BACKBONE_KEYS = {"mobilenet_v2": "mobilenet", "efficientnet_lite2": "effnet"}
BATCH = 8
Trunk = Callable[[torch.Tensor], torch.Tensor]


def textile_batch(backbone: Backbone, count: int) -> torch.Tensor:
    files = textile_files(count // 3 + 1)[:count]
    return torch.stack([backbone.preprocess(decode_rgb(data, max_pixels=10**8, name=name)) for name, data, _ in files])


def compiled_trunk(backbone: Backbone, example: torch.Tensor) -> Trunk:
    """``torch.compile`` of the same folded module graft exports, compiled here on the example batch (static
    shapes: both backbones' modules share one forward, which would otherwise be recompiled for any size)."""
    module = torch.compile(backbone.graph(0, backbone.num_blocks).module, dynamic=False)
    started = time.perf_counter()
    with torch.inference_mode():
        module(example)
    print(f"  torch.compile took {time.perf_counter() - started:.0f} s", file=sys.stderr)

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        return module(images)

    return run


def candidates(backbone: Backbone, example: torch.Tensor, with_compile: bool) -> dict[str, list[tuple[Trunk, int]]]:
    """Each exact candidate in its set-ups: (trunk, callers side by side)."""
    graph = backbone.graph(0, backbone.num_blocks)
    cores = torch.get_num_threads()
    arms: dict[str, list[tuple[Trunk, int]]] = {}
    for name in ("onnxruntime", "openvino"):
        spec = RUNTIMES[name]
        if spec.missing() is None:
            arms[name] = [
                (spec.compile(graph, Precision.FP32, Lanes(1, cores)), 1),
                (spec.compile(graph, Precision.FP32, Lanes(cores, 1)), cores),
            ]
    if with_compile:
        arms["torch_compile"] = [(compiled_trunk(backbone, example), 1)]
    return arms


def rate(trunk: Trunk, batch: torch.Tensor, callers: int, seconds: float) -> float:
    return images_per_second(trunk, batch, callers, seconds=seconds)


def served(backbone: Backbone) -> Trunk:
    return lambda images: backbone.features(images)


def trunk_rounds(backbones: dict[str, Backbone], reduced: dict[str, dict[str, Backbone]], args) -> dict:
    result: dict = {}
    for name, backbone in backbones.items():
        key = BACKBONE_KEYS[name]
        batch = torch.randn(BATCH, 3, backbone.spec.crop_size, backbone.spec.crop_size)
        eager = published_trunk(backbone)
        arms = candidates(backbone, batch, args.compile)
        lanes = backbone.lanes.count
        samples: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
            measured = {
                "torch_eager": rate(eager, batch, 1, args.seconds),
                "trunk": rate(served(backbone), batch, lanes, args.seconds),
            }
            for arm, setups in arms.items():
                measured[arm] = max(rate(trunk, batch, callers, args.seconds) for trunk, callers in setups)
            for precision, other in reduced.get(name, {}).items():
                measured[f"trunk_{precision}"] = rate(served(other), batch, lanes, args.seconds)
            for arm, value in measured.items():
                samples.setdefault(arm, []).append(value)
            shown = ", ".join(f"{arm}={value:.0f}" for arm, value in measured.items())
            print(f"{name} round {round_ + 1}: {shown}", file=sys.stderr)
        fastest = [max(samples[arm][i] for arm in arms) for i in range(args.rounds)]
        result[f"{key}_ips"] = {arm: round(statistics.median(values), 1) for arm, values in samples.items()}
        result[f"{key}_serving_runtime"] = backbone.trunk.runtime
        result[f"trunk_fp32_over_torch_eager_{key}"] = median_ratio(samples["trunk"], samples["torch_eager"])
        result[f"trunk_over_fastest_exact_candidate_{key}"] = median_ratio(samples["trunk"], fastest)
        for precision in reduced.get(name, {}):
            result[f"{precision}_over_fp32_{key}"] = median_ratio(samples[f"trunk_{precision}"], samples["trunk"])
        images = textile_batch(backbone, 64)
        result[f"fp32_max_abs_diff_{key}"] = float((backbone.features(images) - eager(images)).abs().max())
    keys = [BACKBONE_KEYS[name] for name in backbones]
    result["trunk_over_fastest_exact_candidate"] = min(
        result[f"trunk_over_fastest_exact_candidate_{key}"] for key in keys
    )
    return result


def median_ratio(top: list[float], bottom: list[float]) -> float:
    return round(statistics.median(a / b for a, b in zip(top, bottom, strict=True)), 3)


def tuning(backbone: Backbone, args) -> dict:
    """The serving runtime's trunk on batches of 8 cut into micro-batches of 1 to 8, run as one batch per core
    side by side (each single-threaded) or one batch at a time on every core: which graft's CPU placement uses."""
    spec = RUNTIMES[backbone.trunk.runtime]
    graph = backbone.graph(0, backbone.num_blocks)
    cores = torch.get_num_threads()
    setups = {"side_by_side": Lanes(cores, 1), "one_wide": Lanes(1, cores)}
    compiled = {name: spec.compile(graph, backbone.placement.precision, lanes) for name, lanes in setups.items()}
    batch = torch.randn(BATCH, 3, backbone.spec.crop_size, backbone.spec.crop_size)
    samples: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, trunk in compiled.items():
            for micro in (1, 2, 4, 8):

                def cut(images: torch.Tensor, trunk: Trunk = trunk, micro: int = micro) -> torch.Tensor:
                    return torch.cat([trunk(part) for part in images.split(micro)])

                key = f"{name}_micro_{micro}"
                samples.setdefault(key, []).append(rate(cut, batch, setups[name].count, args.seconds / 2))
    return {key: round(statistics.median(values), 1) for key, values in samples.items()}


async def engine_rounds(core, args) -> dict:
    """The engine with 1 and 1,000 heads against the same trunk alone, batches of 8, rounds interleaved."""
    backbone = core.backbones["mobilenet_v2"]
    images = torch.randn(args.images, 3, 224, 224)
    names = create_linear_heads(core, 1000)
    samples: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        measured = {
            "trunk_alone": rate(served(backbone), images[:BATCH], backbone.lanes.count, args.seconds),
            "engine_1_head": await engine_ips(core, images, names[:1], BATCH, False),
            "engine_1000_heads": await engine_ips(core, images, names, BATCH, False),
        }
        for arm, value in measured.items():
            samples.setdefault(arm, []).append(value)
        print(f"engine round {round_ + 1}: {measured}", file=sys.stderr)
    return {
        "engine_ips": {arm: round(statistics.median(values), 1) for arm, values in samples.items()},
        "engine_1_head_over_trunk_alone": median_ratio(samples["engine_1_head"], samples["trunk_alone"]),
        "engine_1000_heads_over_1_head": median_ratio(samples["engine_1000_heads"], samples["engine_1_head"]),
    }


def accuracy_by_precision(cores: dict[str, Core], textile_splits: int) -> dict:
    """Linear heads trained by graft on each precision's MobileNetV2 features, the same splits, tested alike:
    Fashion-MNIST 2,000 / 2,000, and ``textile_splits`` random textile 300 / 1,700 splits (one split's test
    accuracy moves by a point or more with which 300 images train: the mean over splits is the figure)."""
    fashion_train = [(f"{i}.png", d, label) for i, (d, label) in enumerate(fashion_mnist_pngs("train", 200))]
    fashion_test = [(f"{i}.png", d, label) for i, (d, label) in enumerate(fashion_mnist_pngs("test", 200))]
    files = textile_files(10_000)
    labels = [label for _, _, label in files]
    splits = [("fashion_mnist", fashion_train, fashion_test)]
    for seed in range(textile_splits):
        train, test = train_test_split(files, train_size=300, test_size=1700, stratify=labels, random_state=seed)
        splits.append((f"textile{seed}", train, test))
    accuracies: dict[str, dict[str, float]] = {}
    for precision, core in cores.items():
        backbone = core.backbones["mobilenet_v2"]
        for name, train_items, test_items in splits:
            train = core.datasets.create(TENANT, f"{name}-train", train_items)
            test = core.datasets.create(TENANT, f"{name}-test", test_items)
            request = TrainRequest(dataset_id=train.id, head_name=f"{name.replace('_', '-')}", backbone=backbone.name)
            version = core.trainer.train(TENANT, request)
            examples = core.datasets.examples(TENANT, test.id)
            index = {label: i for i, label in enumerate(train.classes)}
            y_test = torch.tensor([index[label] for _, label in examples])
            x_test = core.extractor.features(backbone, backbone.num_blocks, [sha for sha, _ in examples])
            accuracies.setdefault(precision, {})[name] = head_accuracy(core, version, x_test, y_test)
            print(f"{name} {precision}: {accuracies[precision][name]:.4f}", file=sys.stderr)
    result: dict = {}
    for precision, by_split in accuracies.items():
        textile = [by_split[f"textile{seed}"] for seed in range(textile_splits)]
        result[f"fashion_mnist_{precision}_acc"] = round(by_split["fashion_mnist"], 4)
        result[f"textile_{precision}_acc_mean"] = round(statistics.mean(textile), 4)
        result[f"textile_{precision}_acc_splits"] = [round(value, 4) for value in textile]
    for precision in cores:
        if precision != "fp32":
            for dataset, key in (("fashion_mnist", "fashion_mnist_{}_acc"), ("textile", "textile_{}_acc_mean")):
                points = 100 * (result[key.format(precision)] - result[key.format("fp32")])
                result[f"{precision}_minus_fp32_acc_points_{dataset}"] = round(points, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="each arm's timing window per round")
    parser.add_argument("--images", type=int, default=256, help="requests per engine measurement")
    parser.add_argument("--textile-splits", type=int, default=5, help="random 300 / 1,700 textile splits")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s, no torch.compile, no accuracy")
    args = parser.parse_args()
    args.compile = not args.quick
    if args.quick:
        args.rounds, args.seconds, args.images = 2, 1.0, 64

    cores = {
        precision: open_core(
            backbones=list(BACKBONE_KEYS),
            trunk_precision=None if precision == "fp32" else precision,
            quota_heads=100_000,
            quota_head_versions=100_000,
        )
        for precision in ("fp32", "int8", "bf16")
    }
    backbones = cores["fp32"].backbones
    reduced = {name: {p: cores[p].backbones[name] for p in ("int8", "bf16")} for name in BACKBONE_KEYS}
    result: dict = {
        "device": str(cores["fp32"].placement.device),
        "torch_threads": torch.get_num_threads(),
        "batch": BATCH,
        "rounds": args.rounds,
        "trunks": {
            p: {name: core.backbones[name].trunk.model_dump(mode="json") for name in BACKBONE_KEYS}
            for p, core in cores.items()
        },
    }
    result.update(trunk_rounds(backbones, reduced, args))
    for precision in ("int8", "bf16"):
        result[f"{precision}_over_fp32"] = min(result[f"{precision}_over_fp32_{key}"] for key in BACKBONE_KEYS.values())
    result["reduced_precision"] = max(("int8", "bf16"), key=lambda p: result[f"{p}_over_fp32"])
    result["reduced_over_fp32"] = result[f"{result['reduced_precision']}_over_fp32"]
    result["tuning_mobilenet_ips"] = tuning(backbones["mobilenet_v2"], args)
    print(f"tuning: {result['tuning_mobilenet_ips']}", file=sys.stderr)
    result.update(asyncio.run(engine_rounds(cores["fp32"], args)))
    if not args.quick:
        result.update(accuracy_by_precision(cores, args.textile_splits))
        chosen = result["reduced_precision"]
        result["reduced_minus_fp32_acc_points"] = min(
            result[f"{chosen}_minus_fp32_acc_points_{dataset}"] for dataset in ("fashion_mnist", "textile")
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
