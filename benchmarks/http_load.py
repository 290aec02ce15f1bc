"""HTTP prediction throughput and latency against a real ``bentoml serve``, beside the engine itself.

One run, loopback only, bounded in time:
- the in-process engine (decode + batcher + trunk + head, no transport) at
  saturation: the ceiling for the service;
- ``bentoml serve`` with JPEG predictions (JSON, base64) at concurrency 1, 8,
  32 and 128, against one head and against 100 heads (requests spread
  uniformly), over ``--rounds`` rounds in alternating level order; each
  figure is the median over rounds, and each ratio to the best level is taken
  within a round (this machine's speed drifts by a fifth within minutes).
  Flat throughput means images/s at 32 and 128 stay near the best level
  (``ips_at_*_over_best``), and p99 grows only as the queue does: each level
  reports p99 over the time a closed loop must wait behind the requests in
  flight (concurrency / images/s, Little's law);
- overload: a second server whose queue holds 16 images, at 128 in flight:
  what does not fit is refused at once with 429, and the answered keep a
  short p99.
The client shares the machine's cores with the server, so its own CPU use is
reported too.

    python benchmarks/http_load.py           # prints one JSON object last
"""

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil
from engine_setup import create_linear_heads

from harness.sample_data import textile_files
from harness.servers import start_server
from service.config import Settings
from service.core import Core
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor

TENANT = "default"  # the tenant of GRAFT_AUTH=open
LEVELS = (1, 8, 32, 128)
MEDIAN_KEYS = ("ips", "p50_ms", "p99_ms", "p99_over_queue_wait", "client_cpu_cores")
# Quotas are tenant policy, not capacity: lifted so that many heads fit and the rate limit never binds.
UNLIMITED_QUOTAS = {
    "GRAFT_QUOTA_HEADS": "100000",
    "GRAFT_QUOTA_HEAD_VERSIONS": "100000",
    "GRAFT_QUOTA_PREDICT_IMAGES_PER_S": "1000000",
    "GRAFT_QUOTA_PREDICT_BURST": "1000000",
}


async def engine_ips(core: Core, jpegs: list[bytes], heads: list[str], concurrency: int, seconds: float) -> float:
    predictor = Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), core.settings)
    for name in heads:  # warm cache
        await predictor.predict(TENANT, jpegs[:1], [name])
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int) -> None:
        nonlocal done
        i = worker
        while time.perf_counter() < deadline:
            await predictor.predict(TENANT, [jpegs[i % len(jpegs)]], [heads[i % len(heads)]])
            done += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    await predictor.stop()
    return done / elapsed


async def http_level(
    url: str,
    bodies: list[bytes],
    heads: list[str],
    concurrency: int,
    seconds: float,
    *,
    path: str = "/v1/predict",
    model_header: str | None = None,
) -> dict:
    """``concurrency`` clients in a closed loop for ``seconds``; ``model_header`` also names the head in a header."""
    latencies: list[float] = []
    errors = refused = 0
    deadline = time.perf_counter() + seconds
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])

    async def client(http: aiohttp.ClientSession, worker: int) -> None:
        nonlocal errors, refused
        i = worker
        while time.perf_counter() < deadline:
            head = heads[i % len(heads)]
            body = bodies[(i // len(heads)) % len(bodies)].replace(b"__HEAD__", head.encode())
            headers = {"Content-Type": "application/json"} | ({model_header: head} if model_header else {})
            started = time.perf_counter()
            async with http.post(url + path, data=body, headers=headers) as response:
                await response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            errors += response.status != 200
            refused += response.status == 429
            i += concurrency

    # aiohttp, not httpx: the client shares the server's cores, and at 32-128 in flight httpx took 0.2-0.4 of
    # a core where aiohttp takes 0.02-0.05.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    client_cpu = (sum(me.cpu_times()[:2]) - cpu_before) / elapsed
    ips = (len(latencies) - errors) / elapsed  # answered images only
    p99 = float(np.percentile(latencies, 99))
    return {
        "ips": round(ips, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(p99, 1),
        "p99_over_queue_wait": round(p99 / (1000 * concurrency / ips), 2) if ips else None,
        "requests": len(latencies),
        "errors": errors,
        "refused_429": refused,
        "client_cpu_cores": round(client_cpu, 2),
    }


def _median_level(levels: list[dict]) -> dict:
    """One level's figures over rounds: medians of the rates and times, totals of the counts."""
    out = {key: round(statistics.median(level[key] for level in levels), 2) for key in MEDIAN_KEYS}
    out |= {key: sum(level[key] for level in levels) for key in ("requests", "errors", "refused_429")}
    return out | {"ips_rounds": [level["ips"] for level in levels]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="each level is measured once per round")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="graft-http-load-"))
    settings = Settings(data_dir=data_dir, auth="open", quota_predict_images_per_s=1e6, quota_predict_burst=10**6)
    core = Core.open(settings)
    heads = create_linear_heads(core, 100, tenant=TENANT)
    jpegs = [data for _, data, _ in textile_files(per_class=10)]
    bodies = [
        json.dumps({"images": [base64.b64encode(j).decode()], "heads": ["__HEAD__"], "top_k": 5}).encode()
        for j in jpegs
    ]

    result: dict = {"seconds_per_level": args.seconds, "rounds": args.rounds, "image": "250x250 JPEG"}
    result["heads_total"] = len(heads)
    result["engine_ips"] = round(await engine_ips(core, jpegs, heads[:1], 32, args.seconds), 2)
    print(f"engine {result['engine_ips']} images/s", file=sys.stderr)
    del core  # free its memory before the server starts

    server = start_server(data_dir, GRAFT_AUTH="open", **UNLIMITED_QUOTAS)
    rounds: dict[str, dict[int, list[dict]]] = {"heads_1": {}, "heads_100": {}}
    try:
        for used in (heads[:1], heads):
            await http_level(server.http_url, bodies, used, 8, 3)  # warm-up: loads heads, fills caches
        for round_ in range(args.rounds):
            for label, used in (("heads_1", heads[:1]), ("heads_100", heads)):
                for concurrency in LEVELS if round_ % 2 == 0 else LEVELS[::-1]:  # alternate: drift cancels out
                    level = await http_level(server.http_url, bodies, used, concurrency, args.seconds)
                    rounds[label].setdefault(concurrency, []).append(level)
                    print(f"round {round_ + 1}", label, concurrency, level, file=sys.stderr)
    finally:
        server.stop()
    for label, by_level in rounds.items():
        result[label] = {f"c{concurrency}": _median_level(levels) for concurrency, levels in sorted(by_level.items())}

    server = start_server(data_dir, GRAFT_AUTH="open", GRAFT_MAX_QUEUE_IMAGES="16", **UNLIMITED_QUOTAS)
    try:
        await http_level(server.http_url, bodies, heads[:1], 8, 3)
        result["overload_queue_16_c128"] = await http_level(server.http_url, bodies, heads[:1], 128, args.seconds)
        print("overload", result["overload_queue_16_c128"], file=sys.stderr)
    finally:
        server.stop()

    saturation = max(level["ips"] for level in result["heads_1"].values())
    result["http_ips_saturation"] = saturation
    result["ratio"] = round(saturation / result["engine_ips"], 3)
    for label, by_level in rounds.items():
        prefix = "" if label == "heads_1" else "heads_100_"
        for concurrency in (32, 128):
            # per round, against that round's best level; the median over rounds
            over_best = [
                by_level[concurrency][r]["ips"] / max(levels[r]["ips"] for levels in by_level.values())
                for r in range(args.rounds)
            ]
            result[f"{prefix}ips_at_{concurrency}_over_best"] = round(statistics.median(over_best), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
