"""What a shadow version and per-version monitoring cost, and how soon monitoring notices drift.

One run on mobilenet_v2, through the service's own predictor and monitor (in
process, no HTTP), with linear heads trained by graft on 300 textile images drawn at random;
the other 1,700 textile images are unseen in-distribution traffic and
Fashion-MNIST test images are the shifted traffic:
- ``shadow_throughput_ratio``: images/s of one head with a shadow version
  attached over the same head without one (rounds alternate, median of each);
- ``monitoring_overhead_ratio``: images/s with monitoring on over off (two
  runtimes on the same registry, rounds alternating);
- ``drift_detected_after``: a fresh head version receives 500 unseen textile
  images, then Fashion-MNIST images: how many of those it answers before
  ``:monitor`` says ``drifting``; ``drift_detected_after_mid_window`` the
  same with the shift starting half-way through a window;
- ``false_alarm_windows``: windows flagged over ``--clean-windows`` (20)
  windows of unseen textile images only (each window a random draw of them);
- ``ood_auroc``: the per-image OOD score (the version's own monitoring
  reference) separating unseen textile images from Fashion-MNIST images.
Draws benchmarks/results/monitoring.png: the drift test's statistic against
its threshold per window along the stream, and the OOD scores of both kinds
of images.

    python benchmarks/monitoring.py        # prints one JSON object last
"""

import argparse
import asyncio
import json
import random
import statistics
from pathlib import Path

import torch
from engine_setup import CONCURRENCY, REQUEST_IMAGES, TENANT, images_per_second, open_core

from adapters.kinds import HeadKind
from adapters.monitoring import MonitoringReference
from harness.sample_data import fashion_mnist_pngs, textile_files
from service.core import Core
from service.engine.predictor import Predictor
from service.prediction_options import PredictOptions
from service.runtime import Runtime
from service.store.windows import MonitorWindow
from service.training import TrainRequest

OUT = Path(__file__).resolve().parent / "results"
TRAINING_IMAGES = 300


def split(files: list[tuple[str, bytes, str]], rng: random.Random) -> tuple[list[tuple[str, bytes, str]], list[bytes]]:
    """TRAINING_IMAGES drawn at random, the rest unseen: both with the data set's class mix, so the unseen images
    are in distribution (a different mix of the same classes is a shift of its own, which the drift test sees)."""
    shuffled = rng.sample(files, len(files))
    return shuffled[:TRAINING_IMAGES], [data for _, data, _ in shuffled[TRAINING_IMAGES:]]


def train(core: Core, head: str, dataset_id: str, seed: int) -> int:
    """A linear head version trained by graft on the dataset; its version number."""
    request = TrainRequest(dataset_id=dataset_id, head_name=head, kind=HeadKind("linear"), seed=seed)
    return core.trainer.train(TENANT, request).version


async def alternating(arms: dict[str, tuple[Predictor, str]], images: list[bytes], rounds: int) -> dict[str, float]:
    """Each arm's median images/s over ``rounds`` rounds, the arms taking turns within every round (a shared,
    noisy machine slows both alike), after one warm-up round each."""
    for predictor, head in arms.values():
        await images_per_second(predictor, head, images[: 2 * REQUEST_IMAGES * CONCURRENCY])
    samples: dict[str, list[float]] = {arm: [] for arm in arms}
    for turn in range(rounds):
        order = list(arms) if turn % 2 == 0 else list(reversed(arms))
        for arm in order:
            predictor, head = arms[arm]
            samples[arm].append(await images_per_second(predictor, head, images))
    return {arm: statistics.median(values) for arm, values in samples.items()}


async def stream(
    runtime: Runtime, head: str, images: list[bytes], *, until_flagged: bool = False
) -> tuple[list[list[float]], int | None]:
    """Send ``images`` to ``head`` in order, REQUEST_IMAGES at a time, each request's observations flushed
    (windows close at flush); each image's pooled embedding, and how many images had been answered when the
    version first read ``drifting`` (None: never). ``until_flagged``: stop there."""
    name, version = head.split("@")
    embeddings: list[list[float]] = []
    flagged_at = None
    for start in range(0, len(images), REQUEST_IMAGES):
        answers = await runtime.predictor.predict(
            TENANT, images[start : start + REQUEST_IMAGES], [head], PredictOptions(include_embedding=True)
        )
        embeddings += [answer.embedding or [] for answer in answers]
        await runtime.monitor.flush()
        if flagged_at is None:
            state = runtime.monitor.window_store.drift_state(TENANT, name, int(version))
            if state.status == "drifting":
                flagged_at = len(embeddings)
                if until_flagged:
                    break
    return embeddings, flagged_at


def windows_of(runtime: Runtime, head: str) -> list[MonitorWindow]:
    name, version = head.split("@")
    return runtime.monitor.window_store.windows(TENANT, name, int(version))


def reference_of(core: Core, head: str) -> MonitoringReference:
    tensors = core.heads.load_monitoring(core.heads.resolve(TENANT, head))
    if tensors is None:
        raise RuntimeError(f"{head} has no monitoring reference")
    return MonitoringReference.from_tensors(tensors)


def draw(drift_windows: list[MonitorWindow], clean: int, scores: dict[str, list[float]], threshold: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ends = [sum(w.predictions for w in drift_windows[: i + 1]) for i in range(len(drift_windows))]
    tested = [(end, w.drift) for end, w in zip(ends, drift_windows, strict=True) if w.drift is not None]
    left.plot([e for e, _ in tested], [d.statistic for _, d in tested], "o-", label="window's MMD statistic")
    left.plot([e for e, _ in tested], [d.threshold for _, d in tested], "k--", label="its permutation threshold")
    left.axvline(clean, color="red", alpha=0.5, label="Fashion-MNIST images begin")
    left.set_yscale("log")
    left.set_xlabel("images answered by the version")
    left.set_title("drift test per window (textile head)")
    left.legend(fontsize=8)
    for label, values in scores.items():
        right.hist(values, bins=40, alpha=0.6, label=label)
    right.axvline(threshold, color="black", linestyle="--", label="OOD threshold (hold-out 95 %)")
    right.set_xscale("log")
    right.set_xlabel("OOD score")
    right.set_title("per-image OOD score")
    right.legend(fontsize=8)
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    path = OUT / "monitoring.png"
    fig.savefig(path, dpi=110)
    return path


def auroc(negatives: list[float], positives: list[float]) -> float:
    """P(a positive scores above a negative), ties counting half: the ROC curve's area."""
    above = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return above / (len(positives) * len(negatives))


async def measure(args: argparse.Namespace) -> dict:
    core = open_core(backbones=["mobilenet_v2"], default_backbone="mobilenet_v2")
    rng = random.Random(args.seed)
    training, unseen = split(textile_files(per_class=10_000), rng)
    shifted = [data for data, _ in fashion_mnist_pngs("test", 100, seed=0)]
    dataset = core.datasets.create(TENANT, "textile", training)
    for head in ("plain", "drift", "drift-mid", "clean"):
        train(core, head, dataset.id, seed=0)
    train(core, "shadowed", dataset.id, seed=0)
    train(core, "shadowed", dataset.id, seed=1)
    core.heads.set_shadow(TENANT, "shadowed", 2)
    unmonitored = Core.open(core.settings.model_copy(update={"monitoring": False}))

    runtime, runtime_off = Runtime.around(core), Runtime.around(unmonitored)
    await runtime.start()
    await runtime_off.start()
    try:
        load = rng.sample(unseen, args.throughput_images)
        ips = await alternating(
            {
                "without_shadow": (runtime.predictor, "plain@1"),
                "with_shadow": (runtime.predictor, "shadowed@1"),
                "monitoring_off": (runtime_off.predictor, "plain@1"),
            },
            load,
            args.rounds,
        )
        window = core.settings.monitor_window
        order = rng.sample(unseen, len(unseen))
        in_distribution = order[: args.clean_images]
        embedded, flagged_at = await stream(runtime, "drift@1", in_distribution + shifted)
        drift_windows = windows_of(runtime, "drift@1")
        mid = args.clean_images + window // 2
        _, flagged_mid_at = await stream(runtime, "drift-mid@1", order[:mid] + shifted, until_flagged=True)
        for _ in range(args.clean_windows):
            await stream(runtime, "clean@1", rng.sample(unseen, window))
        clean_windows = windows_of(runtime, "clean@1")
    finally:
        await runtime.stop()
        await runtime_off.stop()

    reference = reference_of(core, "drift@1")
    in_scores = reference.ood_scores(torch.tensor(embedded[: args.clean_images])).tolist()
    out_scores = reference.ood_scores(torch.tensor(embedded[args.clean_images :])).tolist()
    figure = draw(
        drift_windows,
        args.clean_images,
        {"unseen textile images": in_scores, "Fashion-MNIST images": out_scores},
        reference.ood_threshold,
    )
    return {
        "backbone": "mobilenet_v2",
        "seed": args.seed,
        "training_images": len(training),
        "unseen_images": len(unseen),
        "shifted_images": len(shifted),
        "window": window,
        "throughput_images": args.throughput_images,
        "rounds": args.rounds,
        "ips_without_shadow": round(ips["without_shadow"], 1),
        "ips_with_shadow": round(ips["with_shadow"], 1),
        "ips_monitoring_off": round(ips["monitoring_off"], 1),
        "shadow_throughput_ratio": round(ips["with_shadow"] / ips["without_shadow"], 3),
        "monitoring_overhead_ratio": round(ips["without_shadow"] / ips["monitoring_off"], 3),
        "drift_detected_after": None if flagged_at is None else flagged_at - args.clean_images,
        "drift_detected_after_mid_window": None if flagged_mid_at is None else flagged_mid_at - mid,
        "clean_windows": len(clean_windows),
        "false_alarm_windows": sum(w.drift is not None and w.drift.drifting for w in clean_windows),
        "ood_auroc": round(auroc(in_scores, out_scores), 4),
        "ood_rate_unseen": round(sum(s > reference.ood_threshold for s in in_scores) / len(in_scores), 3),
        "ood_rate_shifted": round(sum(s > reference.ood_threshold for s in out_scores) / len(out_scores), 3),
        "figure": str(figure.relative_to(OUT.parent.parent)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--throughput-images", type=int, default=400, help="images per throughput round")
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds per arm")
    parser.add_argument("--seed", type=int, default=0, help="the training draw and the streams' order")
    parser.add_argument("--clean-images", type=int, default=500, help="in-distribution images before the shift")
    parser.add_argument("--clean-windows", type=int, default=20, help="windows of in-distribution images only")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args))))


if __name__ == "__main__":
    main()
