"""Serving throughput as the number of distinct heads grows, against the raw torchvision trunk.

All measured in one run, on pre-decoded 224x224 inputs, in batches of the same size:
- raw (``raw_trunk_ips``): what a user would run without graft. The published
  torchvision model (its ``features`` blocks, real batch norms, the same
  weights) in eval mode under ``torch.no_grad()``, global average pooling and
  one linear head (the same head as the engine's) as a matmul, in a plain
  loop over the batches, on a thread of its own as the engine's trunk is (on
  this shared machine the process's main thread ran the same loop up to 6x
  slower for its first minute or so, which would flatter graft; see README).
  Each batch is run in the same
  micro-batches as graft's trunk (4 images on CPU, see
  service/engine/device.py): on 2 cores that is twice as fast as a whole batch
  of 32, so raw gets the best of both; ``raw_whole_batch_ips`` is the batch
  run whole, for reference;
- the engine (one shared batcher, heterogeneous batches) with 1, 100 and 1,000
  distinct linear heads, requests spread uniformly over the heads: each image
  submitted as a request, batched, the trunk (batch norms folded into its
  convolutions at load time) on the batcher's worker thread, the gathered
  linear heads, each row's logits handed back through its future;
- "one batch per head" (how per-model servers such as Ray Serve's multiplexing
  group work) with the same heads;
- resident memory per extra linear head with 10,000 heads loaded;
- every other pretrained backbone that loads here: raw model against the
  engine with one head (``backbones`` in the JSON).
Draws benchmarks/results/serving.png (throughput against number of heads).

    python benchmarks/serving.py               # prints one JSON object last
    python benchmarks/serving.py --one-head    # only raw, raw whole-batch and the engine with one head
"""

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from engine_setup import TENANT, create_linear_heads, head_param_bytes, open_core
from torch import nn

from service.engine.backbones import BACKBONES, Backbone
from service.engine.batcher import Batcher
from service.engine.head_cache import HeadCache, LoadedHead
from service.engine.predictor import trunk_workers

OUT = Path(__file__).resolve().parent / "results"
MAIN_BACKBONE = "mobilenet_v2"
QUOTAS = {"quota_heads": 100_000, "quota_head_versions": 100_000}  # tenant policy, lifted for 10,000 heads


class RawModel:
    """The published model and one linear head, run the way a user would without graft (see the module doc)."""

    def __init__(self, backbone: Backbone, head: LoadedHead) -> None:
        self.trunk = backbone.cpu_copy(0)  # the published blocks (torchvision's ``features``), unfolded, eval
        self.weight, self.bias = (t.cpu() for t in head.linear)
        self.micro_batch = backbone.placement.micro_batch

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, whole: bool = False) -> torch.Tensor:
        parts = [batch] if whole or self.micro_batch is None else batch.split(self.micro_batch)
        pooled = [torch.flatten(nn.functional.adaptive_avg_pool2d(self.trunk(part), 1), 1) for part in parts]
        return torch.cat(pooled) @ self.weight.T + self.bias

    def ips(self, images: torch.Tensor, batch_size: int, whole: bool = False) -> float:
        """Images/s of the plain loop, run on a fresh thread of its own (as the engine's batches are)."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="raw") as thread:
            return thread.submit(self._loop, images, batch_size, whole).result()

    def _loop(self, images: torch.Tensor, batch_size: int, whole: bool) -> float:
        self(images[:batch_size], whole)  # warm-up, as the engine gets
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            self(images[start : start + batch_size], whole)
        return len(images) / (time.perf_counter() - started)


async def engine_ips(
    core, images: torch.Tensor, names: list[str], batch_size: int, group_by_head: bool, workers: int | None = None
) -> float:
    """Images/s of the shared batcher; ``workers`` batches side by side (default: as the service runs them)."""
    cache = HeadCache(core.heads, core.backbones, max_bytes=1 << 34)
    heads = [await cache.get(TENANT, name) for name in names]  # loaded before timing: a warm cache
    backbone = core.backbones[core.settings.default_backbone]
    batcher = Batcher(
        backbone,
        max_batch_size=batch_size,
        max_latency_ms=2,
        max_queue=len(images) + 1,
        group_by_head=group_by_head,
        workers=workers or trunk_workers(backbone),
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
    ax.axhline(result["raw_trunk_ips"], color="grey", linestyle=":", label="raw torchvision model + head")
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


async def raw_model(core, name: str) -> RawModel:
    """The raw arm with the engine's first head (``name``)."""
    head = await HeadCache(core.heads, core.backbones, max_bytes=1 << 30).get(TENANT, name)
    return RawModel(core.backbones[core.settings.default_backbone], head)


async def measure_round(raw: RawModel, core, images: torch.Tensor, names: list[str], args, first: bool) -> dict:
    """One measurement of each arm.

    The two arms of ``heads_1_over_raw`` run back to back, raw first in odd
    rounds and second in even ones, so the shared machine's load drifts as
    little as possible between them; the slow arms follow.
    """
    this_round: dict[str, float] = {}
    one = [("raw_trunk_ips", None), ("heads_1_ips", False)]
    for key, grouped in one if first else one[::-1]:
        this_round[key] = (
            raw.ips(images, args.batch_size)
            if grouped is None
            else await engine_ips(core, images, names[:1], args.batch_size, grouped)
        )
    this_round["raw_whole_batch_ips"] = raw.ips(images, args.batch_size, whole=True)
    if not args.one_head:
        this_round["per_head_batches_1_ips"] = await engine_ips(core, images, names[:1], args.batch_size, True)
        for count in (100, 1000):
            for grouped, key in ((False, f"heads_{count}_ips"), (True, f"per_head_batches_{count}_ips")):
                this_round[key] = await engine_ips(core, images, names[:count], args.batch_size, grouped)
    return this_round


def ratios(samples: dict[str, list[float]], which: tuple[tuple[str, str, str], ...]) -> dict[str, float]:
    """Each ratio taken within each round (measured a minute apart at most), then the median over rounds.

    That cancels the shared machine's drift between rounds.
    """
    return {
        name: round(statistics.median(a / b for a, b in zip(samples[top], samples[bottom], strict=True)), 3)
        for name, top, bottom in which
        if top in samples and bottom in samples
    }


async def rounds(raw: RawModel, core, images: torch.Tensor, names: list[str], args, label: str) -> dict:
    """Every arm once per round, rounds interleaved; medians of images/s and of the per-round ratios."""
    samples: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        this_round = await measure_round(raw, core, images, names, args, first=round_ % 2 == 0)
        for key, value in this_round.items():
            samples.setdefault(key, []).append(value)
        shown = ", ".join(f"{k}={v:.1f}" for k, v in this_round.items())
        print(f"{label} round {round_ + 1}: {shown}", file=sys.stderr)
    result: dict = {key: round(statistics.median(values), 2) for key, values in samples.items()}
    result.update(
        ratios(
            samples,
            (
                ("heads_1000_over_1", "heads_1000_ips", "heads_1_ips"),
                ("heads_1_over_raw", "heads_1_ips", "raw_trunk_ips"),
                ("heads_1_over_raw_whole_batch", "heads_1_ips", "raw_whole_batch_ips"),
                ("heads_1000_over_per_head_batches", "heads_1000_ips", "per_head_batches_1000_ips"),
            ),
        )
    )
    return result


async def one_head_against_raw(name: str, args: argparse.Namespace) -> dict:
    """Raw model and the engine with one head on backbone ``name``, rounds interleaved; or why it did not load."""
    try:
        core = open_core(backbones=[name], default_backbone=name)
    except Exception as exc:  # e.g. its pinned weights are not provisioned on this machine
        return {"error": str(exc).splitlines()[0]}
    backbone = core.backbones[name]
    torch.manual_seed(0)
    images = torch.randn(args.images, 3, backbone.spec.crop_size, backbone.spec.crop_size)
    names = create_linear_heads(core, 1)
    one_head = argparse.Namespace(**{**vars(args), "one_head": True, "rounds": max(3, args.rounds // 2)})
    result = await rounds(await raw_model(core, names[0]), core, images, names, one_head, name)
    return {key: result[key] for key in ("raw_trunk_ips", "heads_1_ips", "heads_1_over_raw")}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="requests per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-heads", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--one-head", action="store_true", help="only the raw arms and the engine with one head")
    args = parser.parse_args()

    core = open_core(backbones=[MAIN_BACKBONE], **QUOTAS)
    backbone = core.backbones[MAIN_BACKBONE]
    torch.manual_seed(0)
    images = torch.randn(args.images, 3, backbone.spec.crop_size, backbone.spec.crop_size)
    names = create_linear_heads(core, 1 if args.one_head else 1000)
    print("heads created", file=sys.stderr)

    result: dict = {
        "device": str(core.placement.device),
        "batch_size": args.batch_size,
        "images": args.images,
        "trunk_micro_batch": core.placement.micro_batch,
        "trunk_batch_norms_folded": backbone.folded_batch_norms,
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
    }
    result.update(await rounds(await raw_model(core, names[0]), core, images, names, args, MAIN_BACKBONE))
    if args.one_head:
        print(json.dumps(result))
        return

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
