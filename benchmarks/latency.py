"""Latency of single-image requests at low load, against the same work in a plain loop.

One client sends one JPEG at a time (no overlap) to the engine's predict API
(resolve head -> decode -> preprocess -> batcher -> trunk -> head -> top-k).
The raw figure is the same decode + preprocess + trunk + head for one image
in a plain torch loop, so the difference is what the engine adds. Measured
for every pretrained backbone that loads here (``backbones`` in the JSON; the
top-level figures are mobilenet_v2's).

    python benchmarks/latency.py             # prints one JSON object last
"""

import argparse
import asyncio
import json
import statistics
import time

import numpy as np
from engine_setup import TENANT, create_linear_heads, open_core

from harness.sample_data import textile_files
from service.engine.backbones import BACKBONES
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor
from service.engine.preprocess import prepare_image


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q))


async def measure(backbone_name: str, requests: int) -> dict:
    core = open_core(backbones=[backbone_name], default_backbone=backbone_name)
    backbone = core.backbones[backbone_name]
    [name] = create_linear_heads(core, 1)
    jpegs = [data for _, data, _ in textile_files(per_class=10)]
    settings = core.settings
    cache = HeadCache(core.heads, core.backbones, settings.head_cache_bytes)
    head = await cache.get(TENANT, name)

    def raw_once(data: bytes) -> None:
        image = prepare_image(
            backbone, data, name="x", max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
        pooled = backbone.features(image[None])
        (pooled @ head.weight.T + head.bias).softmax(1).topk(5)

    predictor = Predictor(core.backbones, cache, settings)
    for data in jpegs[:5]:  # warm-up both paths
        raw_once(data)
        await predictor.predict(TENANT, [data], [name])

    raw, served = [], []
    for i in range(requests):  # interleaved, so both see the same machine noise
        data = jpegs[i % len(jpegs)]
        started = time.perf_counter()
        raw_once(data)
        raw.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await predictor.predict(TENANT, [data], [name])
        served.append((time.perf_counter() - started) * 1000)
    await predictor.stop()

    p50, raw_single = percentile(served, 50), statistics.median(raw)
    return {
        "requests": requests,
        "device": str(core.placement.device),
        "max_latency_ms": settings.max_latency_ms,
        "p50_ms": round(p50, 2),
        "p95_ms": round(percentile(served, 95), 2),
        "p99_ms": round(percentile(served, 99), 2),
        "raw_single_ms": round(raw_single, 2),
        "target_p50_ms": round(1.2 * raw_single + 5, 2),
        "p50_over_raw": round(p50 / raw_single, 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    result = await measure("mobilenet_v2", args.requests)
    result["backbones"] = {"mobilenet_v2": {key: result[key] for key in ("p50_ms", "p99_ms", "raw_single_ms")}}
    for name, spec in BACKBONES.items():
        if spec.pretrained and name != "mobilenet_v2":
            try:
                result["backbones"][name] = await measure(name, args.requests)
            except Exception as exc:  # e.g. its pinned weights are not provisioned on this machine
                result["backbones"][name] = {"error": str(exc).splitlines()[0]}
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
