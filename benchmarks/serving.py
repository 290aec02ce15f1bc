"""Serving throughput as the number of distinct heads grows, against the raw trunk.

All measured in one run, on pre-decoded 224x224 inputs, with the same batch size:
- raw trunk: a plain loop of trunk calls over full batches (the limit; on CPU
  the trunk runs each batch as micro-batches of 4, see service/engine/device.py);
- the engine (one shared batcher, heterogeneous batches) with 1, 100 and 1,000
  distinct linear heads, requests spread uniformly over the heads;
- "one batch per head" (how per-model servers such as Ray Serve's multiplexing
  group work) with the same heads;
- resident memory per extra linear head with 10,000 heads loaded;
- every other pretrained backbone that loads here: raw trunk against the
  engine with one head (``backbones`` in the JSON).
Draws benchmarks/results/serving.png (throughput against number of heads).

    python benchmarks/serving.py             # prints one JSON object last
"""

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from engine_setup import TENANT, create_linear_heads, head_param_bytes, open_core

from service.engine.backbones import BACKBONES
from service.engine.batcher import Batcher
from service.engine.head_cache import HeadCache

OUT = Path(__file__).resolve().parent / "results"
MAIN_BACKBONE = "mobilenet_v2"
QUOTAS = {"quota_heads": 100_000, "quota_head_versions": 100_000}  # tenant policy, lifted for 10,000 heads


def raw_trunk_ips(backbone, images: torch.Tensor, batch_size: int) -> float:
    backbone.features(images[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        backbone.features(images[start : start + batch_size])
    return len(images) / (time.perf_counter() - started)


async def engine_ips(core, images: torch.Tensor, names: list[str], batch_size: int, group_by_head: bool) -> float:
    cache = HeadCache(core.heads, core.backbones, max_bytes=1 << 34)
    heads = [await cache.get(TENANT, name) for name in names]  # loaded before timing: a warm cache
    batcher = Batcher(
        core.backbones[core.settings.default_backbone],
        max_batch_size=batch_size,
        max_latency_ms=2,
        max_queue=len(images) + 1,
        group_by_head=group_by_head,
    )
    # Warm-up with one full batch, as the raw loop gets: this worker thread's first
    # trunk call at a new shape pays one-time set-up costs.
    await asyncio.gather(*(batcher.submit(image, [heads[0]]) for image in images[:batch_size]))
    started = time.perf_counter()
    await asyncio.gather(*(batcher.submit(image, [heads[i % len(heads)]]) for i, image in enumerate(images)))
    elapsed = time.perf_counter() - started
    await batcher.stop()
    return len(images) / elapsed


async def bytes_per_head(core, names: list[str]) -> float:
    cache = HeadCache(core.heads, core.backbones, max_bytes=1 << 34)
    await cache.get(TENANT, names[0])
    gc.collect()
    before = psutil.Process().memory_info().rss
    for name in names[1:]:
        await cache.get(TENANT, name)
    gc.collect()
    return (psutil.Process().memory_info().rss - before) / (len(names) - 1)


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [1, 100, 1000]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [result[f"heads_{n}_ips"] for n in counts], "o-", label="graft (heterogeneous batches)")
    ax.plot(counts, [result[f"per_head_batches_{n}_ips"] for n in counts], "s--", label="one batch per head")
    ax.axhline(result["raw_trunk_ips"], color="grey", linestyle=":", label="raw trunk (limit)")
    ax.set(
        xscale="log",
        xlabel="distinct heads in the traffic",
        ylabel="images / s",
        title=f"MobileNetV2 on {result['device']}, batch {result['batch_size']}",
    )
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def one_head_against_raw(name: str, args: argparse.Namespace) -> dict:
    """Raw trunk and the engine with one head on backbone ``name``, rounds interleaved; or why it did not load."""
    try:
        core = open_core(backbones=[name], default_backbone=name)
    except Exception as exc:  # e.g. its pinned weights are not provisioned on this machine
        return {"error": str(exc).splitlines()[0]}
    backbone = core.backbones[name]
    torch.manual_seed(0)
    images = torch.randn(args.images, 3, backbone.spec.crop_size, backbone.spec.crop_size)
    names = create_linear_heads(core, 1)
    raw, served = [], []
    for _ in range(max(3, args.rounds // 2)):
        raw.append(raw_trunk_ips(backbone, images, args.batch_size))
        served.append(await engine_ips(core, images, names, args.batch_size, False))
    print(f"{name}: raw {raw}, one head {served}", file=sys.stderr)
    return {
        "raw_trunk_ips": round(statistics.median(raw), 2),
        "heads_1_ips": round(statistics.median(served), 2),
        "heads_1_over_raw": round(statistics.median(a / b for a, b in zip(served, raw, strict=True)), 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="requests per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-heads", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    core = open_core(backbones=[MAIN_BACKBONE], **QUOTAS)
    backbone = core.backbones[MAIN_BACKBONE]
    torch.manual_seed(0)
    images = torch.randn(args.images, 3, backbone.spec.crop_size, backbone.spec.crop_size)
    names = create_linear_heads(core, 1000)
    print("heads created", file=sys.stderr)

    result: dict = {
        "device": str(core.placement.device),
        "batch_size": args.batch_size,
        "images": args.images,
        "trunk_micro_batch": core.placement.micro_batch,
        "rounds": args.rounds,
    }
    # Every configuration is measured once per round, rounds interleaved, and
    # the median round kept: the machine is shared and its noise drifts.
    samples: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        this_round = {"raw_trunk_ips": raw_trunk_ips(backbone, images, args.batch_size)}
        for count in (1, 100, 1000):
            for grouped, key in ((False, f"heads_{count}_ips"), (True, f"per_head_batches_{count}_ips")):
                this_round[key] = await engine_ips(core, images, names[:count], args.batch_size, grouped)
        for key, value in this_round.items():
            samples.setdefault(key, []).append(value)
        print(f"round {round_ + 1}: " + ", ".join(f"{k}={v:.1f}" for k, v in this_round.items()), file=sys.stderr)
    result.update({key: round(statistics.median(values), 2) for key, values in samples.items()})
    # Ratios are taken within each round (measured minutes apart at most), then
    # the median over rounds: that cancels the machine's drift between rounds.
    for name, top, bottom in (
        ("heads_1000_over_1", "heads_1000_ips", "heads_1_ips"),
        ("heads_1_over_raw", "heads_1_ips", "raw_trunk_ips"),
        ("heads_1000_over_per_head_batches", "heads_1000_ips", "per_head_batches_1000_ips"),
    ):
        result[name] = round(statistics.median(a / b for a, b in zip(samples[top], samples[bottom], strict=True)), 3)

    memory_names = names + create_linear_heads(core, args.memory_heads - len(names), prefix="m")
    result["bytes_per_head_10000"] = round(await bytes_per_head(core, memory_names))
    result["head_param_bytes"] = head_param_bytes()
    result["bytes_per_head_budget"] = 2 * head_param_bytes() + 4096
    del core

    result["backbones"] = {
        MAIN_BACKBONE: {key: result[key] for key in ("raw_trunk_ips", "heads_1_ips", "heads_1_over_raw")}
    }
    for name, spec in BACKBONES.items():
        if spec.pretrained and name != MAIN_BACKBONE:
            result["backbones"][name] = await one_head_against_raw(name, args)

    OUT.mkdir(exist_ok=True)
    draw(result, OUT / "serving.png")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
