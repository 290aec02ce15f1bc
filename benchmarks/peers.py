"""graft against Ray Serve model multiplexing, side by side in one run, over HTTP on loopback.

Two Ray peers: ``ray`` runs the published MobileNetV2 in eager torch, as Ray
Serve's documentation writes it; ``ray_same_runtime`` runs graft's own trunk
(the runtime graft chose at start-up), so that ratio measures the serving
architecture alone. All three serve the same 1, 100 and 1,000 linear heads
(Ray reads graft's own safetensors files), to the same client sending the same
JSON bodies (one base64 250x250 JPEG each) at the same concurrency. All are up
for the whole run, and each level is measured on each in turn (the idle ones
only wait), so all see the same machine load: this machine is shared and drifts. The run stops itself (and both
servers) after ``--max-minutes``.
Ray's configuration (``benchmarks/ray_peer.py``) is printed in the JSON.
Draws benchmarks/results/peers.png (throughput against concurrency, 1,000 heads).

    python benchmarks/peers.py               # prints one JSON object last
"""

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from engine_setup import create_linear_heads
from http_load import UNLIMITED_QUOTAS, http_level
from ray import serve
from ray_peer import RayPeerConfig, deploy, head_file, start

from harness.sample_data import textile_files
from harness.servers import REPO, free_port, start_server
from service.config import Settings
from service.core import Core

TENANT = "default"  # the tenant of GRAFT_AUTH=open
OUT = Path(__file__).resolve().parent / "results"
# (heads, concurrency levels); a system's figure for a head count is its best level.
PLAN = ((1, (8, 32)), (100, (32,)), (1000, (1, 8, 32, 128)))

Level = Callable[[list[str], int, float], Awaitable[dict]]


async def compare(systems: dict[str, Level], heads: list[str], seconds: float) -> dict:
    """Every (heads, concurrency) level on each system in turn, after a short warm-up of each.

    Heads the warm-up did not reach are loaded on first use, by both systems alike.
    """
    result: dict = {system: {} for system in systems}
    for count, concurrencies in PLAN:
        used = heads[:count]
        for system, level in systems.items():
            await level(used, 8, 3)  # warm-up: loads the heads, fills caches
            result[system][f"heads_{count}"] = {}
        for concurrency in concurrencies:
            for system, level in systems.items():
                figures = await level(used, concurrency, seconds)
                result[system][f"heads_{count}"][f"c{concurrency}"] = figures
                print(system, count, concurrency, figures, file=sys.stderr)
    return result


PEERS = {"ray": ("torch", "/torch"), "ray_same_runtime": ("graft", "/graft")}  # system -> (its trunk, its route)


@contextmanager
def ray_serve(config: RayPeerConfig) -> Iterator[str]:
    """A local Ray cluster with both peers deployed (``PEERS``); yields its URL and shuts it all down after."""
    # Ray's workers import the deployment from this folder and graft's trunk from the repo.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=config.cpus,
        num_gpus=config.gpus,
        include_dashboard=False,
        object_store_memory=256 << 20,
        log_to_driver=False,
    )
    try:
        port = free_port()
        start(port)
        for trunk, route in PEERS.values():
            deploy(config.model_copy(update={"trunk": trunk}), route)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


async def run(data_dir: Path, config: RayPeerConfig, bodies: list[bytes], heads: list[str], seconds: float) -> dict:
    server = start_server(data_dir, GRAFT_AUTH="open", GRAFT_DEVICE=config.device, **UNLIMITED_QUOTAS)
    try:
        with ray_serve(config) as ray_url:
            systems: dict[str, Level] = {"graft": lambda used, c, s: http_level(server.http_url, bodies, used, c, s)}
            for system, (_, route) in PEERS.items():
                systems[system] = lambda used, c, s, route=route: http_level(
                    ray_url, bodies, used, c, s, path=route, model_header="serve_multiplexed_model_id"
                )
            return await compare(systems, heads, seconds)
    finally:
        server.stop()


def best(levels: dict) -> float:
    return max(figures["ips"] for figures in levels.values())


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {
        "graft": "graft",
        "ray": "Ray Serve, torch (multiplexed + batched)",
        "ray_same_runtime": "Ray Serve, graft's trunk runtime",
    }
    for system, marker in (("graft", "o-"), ("ray", "s--"), ("ray_same_runtime", "^:")):
        levels = result[system]["heads_1000"]
        concurrencies = [int(key[1:]) for key in levels]
        ax.plot(
            concurrencies,
            [levels[f"c{c}"]["ips"] for c in concurrencies],
            marker,
            label=labels[system],
        )
    ax.set(
        xscale="log",
        xlabel="requests in flight",
        ylabel="images / s",
        title="HTTP, 1,000 linear heads, MobileNetV2, CPU",
    )
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def stop_after(minutes: float) -> None:
    """End the whole run (both servers are children of it) if it overruns."""

    def overrun() -> None:
        print(f"peers.py: still running after {minutes} minutes; stopping", file=sys.stderr)
        os._exit(3)

    timer = threading.Timer(minutes * 60, overrun)
    timer.daemon = True
    timer.start()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="the run stops itself after this")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both servers run the trunk")
    args = parser.parse_args()
    stop_after(args.max_minutes)

    data_dir = Path(tempfile.mkdtemp(prefix="graft-peers-"))
    core = Core.open(Settings(data_dir=data_dir, auth="open", quota_heads=100_000, quota_head_versions=100_000))
    heads = create_linear_heads(core, max(count for count, _ in PLAN), tenant=TENANT)
    files = {name: head_file(core.blobs.root, core.heads.resolve(TENANT, name).blob_key) for name in heads}
    del core  # free its memory before the servers start
    jpegs = [data for _, data, _ in textile_files(per_class=10)]
    bodies = [
        json.dumps({"images": [base64.b64encode(j).decode()], "heads": ["__HEAD__"], "top_k": 5}).encode()
        for j in jpegs
    ]
    config = RayPeerConfig.for_device(args.device, files)

    result: dict = {"seconds_per_level": args.seconds, "image": "250x250 JPEG", "ray_config": config.described()}
    result.update(await run(data_dir, config, bodies, heads, args.seconds))
    for count, _ in PLAN:
        for system in ("graft", *PEERS):
            result[f"{system}_http_ips_{count}"] = best(result[system][f"heads_{count}"])
    result["ratio_1"] = round(result["graft_http_ips_1"] / result["ray_http_ips_1"], 3)
    result["ratio_1000"] = round(result["graft_http_ips_1000"] / result["ray_http_ips_1000"], 3)
    result["ratio_1_same_runtime"] = round(result["graft_http_ips_1"] / result["ray_same_runtime_http_ips_1"], 3)
    result["ratio_1000_same_runtime"] = round(
        result["graft_http_ips_1000"] / result["ray_same_runtime_http_ips_1000"], 3
    )
    OUT.mkdir(exist_ok=True)
    draw(result, OUT / "peers.png")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
