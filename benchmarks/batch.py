"""What a batch prediction job costs next to online predictions, and what it does to their latency.

One run on mobilenet_v2, through the service's own predictor and batch runner
(in process, no HTTP), with one linear head over ``--images`` Fashion-MNIST test
images (PNG, 28x28) stored as one dataset:
- ``online_ips``: images/s of the same images sent as online predictions by a
  client that keeps the service saturated (requests of 10 images, 8 in flight);
- ``batch_ips``: images/s of a batch prediction job over the dataset, from its
  creation until it succeeded;
- ``batch_over_online_ips``: their ratio (target >= 0.9);
- ``online_p99_during_batch_over_idle``: the p99 latency of a light client
  (one image per request, one request every 100 ms) while a second batch job
  over the dataset runs, over its p99 while the service is idle (target <= 2;
  half of the idle requests are sent before the job, half after it);
- ``online_p99_during_training_over_idle``: the same light client's p99 while
  a training job runs (a linear head on ``--train-images`` Fashion-MNIST
  training images the service has not seen: their features are extracted
  first, as in any first training) over idle: what a batch job is compared
  with ("online p99 must not suffer more than it does during training").

    python benchmarks/batch.py                  # prints one JSON object last
    python benchmarks/batch.py --images 500     # a quick run
"""

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from engine_setup import CONCURRENCY, REQUEST_IMAGES, TENANT, create_linear_heads, images_per_second, open_core

from harness.sample_data import fashion_mnist_pngs
from service.batch import BatchOptions
from service.engine.predictor import Predictor
from service.runtime import Runtime
from service.training import TrainRequest

OUT = Path(__file__).resolve().parent / "results"
LIGHT_INTERVAL_S = 0.1  # the light client's pace: one image per request
IDLE_SAMPLES = 200
CLASSES = 10


async def batch_seconds(runtime: Runtime, head: str, dataset_id: str) -> float:
    """Seconds from creating a batch prediction over the dataset until it succeeded."""
    started = time.perf_counter()
    batch = await runtime.batches.create(TENANT, [head], dataset_id, BatchOptions())
    while not (found := runtime.batches.get(TENANT, batch.id)).done:
        await asyncio.sleep(0.02)
    assert found.state.value == "succeeded", found
    return time.perf_counter() - started


async def training_seconds(runtime: Runtime, dataset_id: str) -> float:
    """Seconds from submitting a training job (a linear head on the dataset) until it succeeded."""
    started = time.perf_counter()
    job = await runtime.jobs.submit(TENANT, TrainRequest(dataset_id=dataset_id, head_name="trained", kind="linear"))
    while not (found := runtime.jobs.get(TENANT, job.id)).state.done:
        await asyncio.sleep(0.05)
    assert found.state.value == "succeeded", found
    return time.perf_counter() - started


async def light_latencies(
    predictor: Predictor, head: str, images: list[bytes], until: asyncio.Future | int
) -> list[float]:
    """Seconds per one-image request, one every LIGHT_INTERVAL_S, for ``until`` requests or until it is done."""
    latencies: list[float] = []
    while (len(latencies) < until) if isinstance(until, int) else not until.done():
        image = images[len(latencies) % len(images)]
        started = time.perf_counter()
        await predictor.predict(TENANT, [image], [head])
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(LIGHT_INTERVAL_S)
    return latencies


def p99_ms(samples: list[float]) -> float:
    return float(np.percentile(samples, 99)) * 1000


async def measure(args: argparse.Namespace) -> dict:
    core = open_core(
        backbones=["mobilenet_v2"],
        default_backbone="mobilenet_v2",
        quota_predict_images_per_s=1e6,
        quota_predict_burst=10**6,
    )
    files = fashion_mnist_pngs("test", per_class=args.images // CLASSES, seed=args.seed)
    images = [data for data, _ in files]
    dataset = core.datasets.create(
        TENANT, "fashion", [(f"{i}.png", data, label) for i, (data, label) in enumerate(files)]
    )
    train_files = fashion_mnist_pngs("train", per_class=args.train_images // CLASSES, seed=args.seed)
    to_train = core.datasets.create(
        TENANT, "fashion-train", [(f"{i}.png", data, label) for i, (data, label) in enumerate(train_files)]
    )
    (head,) = create_linear_heads(core, 1)
    runtime = Runtime.around(core)
    await runtime.start()
    try:
        await images_per_second(runtime.predictor, head, images[: REQUEST_IMAGES * CONCURRENCY * 4])  # warm-up
        online = await images_per_second(runtime.predictor, head, images)
        batch = len(images) / await batch_seconds(runtime, head, dataset.id)
        # Idle before and after the batch, so that a change in the machine's other load weighs on both alike.
        idle = await light_latencies(runtime.predictor, head, images, IDLE_SAMPLES // 2)
        running = asyncio.ensure_future(batch_seconds(runtime, head, dataset.id))
        during = await light_latencies(runtime.predictor, head, images, running)
        await running
        training = asyncio.ensure_future(training_seconds(runtime, to_train.id))
        while_training = await light_latencies(runtime.predictor, head, images, training)
        await training
        idle += await light_latencies(runtime.predictor, head, images, IDLE_SAMPLES - IDLE_SAMPLES // 2)
    finally:
        await runtime.stop()
    return {
        "backbone": "mobilenet_v2",
        "device": core.backbones["mobilenet_v2"].placement.device.type,
        "cpus": len(os.sched_getaffinity(0)),
        "images": len(images),
        "online_ips": round(online, 1),
        "batch_ips": round(batch, 1),
        "batch_over_online_ips": round(batch / online, 3),
        "idle_p50_ms": round(statistics.median(idle) * 1000, 2),
        "idle_p99_ms": round(p99_ms(idle), 2),
        "during_batch_p50_ms": round(statistics.median(during) * 1000, 2),
        "during_batch_p99_ms": round(p99_ms(during), 2),
        "during_batch_samples": len(during),
        "online_p99_during_batch_over_idle": round(p99_ms(during) / p99_ms(idle), 3),
        "during_training_p99_ms": round(p99_ms(while_training), 2),
        "during_training_samples": len(while_training),
        "online_p99_during_training_over_idle": round(p99_ms(while_training) / p99_ms(idle), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="Fashion-MNIST test images (a multiple of 10)")
    parser.add_argument("--train-images", type=int, default=1000, help="images of the training job (a multiple of 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    OUT.mkdir(exist_ok=True)
    (OUT / "batch.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
