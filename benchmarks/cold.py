"""Cold heads and cold starts: what a prediction costs when nothing is in memory yet.

- Cold heads: 10,000 linear heads stored, a head cache that holds 1,000
  (``GRAFT_HEAD_CACHE_BYTES``), one client through the engine's predict API
  (resolve, load, decode, batcher, trunk, head). Each cold request names a
  head never used before in the run, so it is read from the registry and blob
  store; the warm request right after names the same head again. Interleaved,
  so both see the same machine.
- Cold start: a real ``bentoml serve`` on the same storage, from process
  start to ``/readyz`` 200 (polled every 0.5 s by ``servers.start_server``)
  and to its first answered prediction (whose head is loaded then); the
  median of ``--starts`` starts.

    python benchmarks/cold.py                # prints one JSON object last
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

import httpx
import numpy as np
from engine_setup import create_linear_heads, head_param_bytes

from harness.sample_data import textile_files
from harness.servers import start_server
from service.config import Settings
from service.core import Core
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor

TENANT = "default"  # the tenant of GRAFT_AUTH=open
CACHED_HEADS = 1000
QUOTAS = {"quota_heads": 100_000, "quota_head_versions": 100_000}  # tenant policy, lifted for 10,000 heads


def percentiles(samples: list[float]) -> tuple[float, float]:
    return round(float(np.percentile(samples, 50)), 2), round(float(np.percentile(samples, 99)), 2)


async def cold_heads(core: Core, names: list[str], jpegs: list[bytes], requests: int) -> dict:
    cache = HeadCache(core.heads, core.backbones, max_bytes=CACHED_HEADS * head_param_bytes())
    predictor = Predictor(core.backbones, cache, core.settings)
    for data in jpegs[:5]:  # warm-up of the trunk, on one head the timed requests never name
        await predictor.predict(TENANT, [data], [names[-1]])
    stride = max(1, (len(names) - 1) // requests)
    cold, warm = [], []
    for i in range(requests):
        name, data = names[i * stride], jpegs[i % len(jpegs)]
        for samples in (cold, warm):
            started = time.perf_counter()
            await predictor.predict(TENANT, [data], [name])
            samples.append((time.perf_counter() - started) * 1000)
    await predictor.stop()
    (cold_p50, cold_p99), (warm_p50, warm_p99) = percentiles(cold), percentiles(warm)
    return {
        "heads_stored": len(names),
        "heads_cached": CACHED_HEADS,
        "requests": requests,
        "cold_head_p50_ms": cold_p50,
        "cold_head_p99_ms": cold_p99,
        "warm_p50_ms": warm_p50,
        "warm_p99_ms": warm_p99,
        "cache_holds": len(cache),
    }


def cold_start(data_dir: Path, head: str, jpeg: bytes) -> tuple[float, float]:
    """Seconds from launching ``bentoml serve`` to ready, and to the first answered prediction."""
    body = {"images": [base64.b64encode(jpeg).decode()], "heads": [head], "top_k": 1}
    started = time.perf_counter()
    server = start_server(data_dir, GRAFT_AUTH="open")
    try:
        ready = time.perf_counter() - started
        response = httpx.post(f"{server.http_url}/v1/predict", json=body, timeout=120)
        response.raise_for_status()
        return ready, time.perf_counter() - started
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200, help="cold (and as many warm) predictions")
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="graft-cold-"))
    core = Core.open(Settings(data_dir=data_dir, auth="open", **QUOTAS))
    names = create_linear_heads(core, args.heads, tenant=TENANT)
    print(f"{len(names)} heads stored", file=sys.stderr)
    jpegs = [data for _, data, _ in textile_files(per_class=10)]

    result = await cold_heads(core, names, jpegs, args.requests)
    print(result, file=sys.stderr)
    result["device"] = str(core.placement.device)
    del core  # free its memory before the server starts

    starts = [cold_start(data_dir, names[0], jpegs[0]) for _ in range(args.starts)]
    print(f"starts (ready s, first prediction s): {starts}", file=sys.stderr)
    result["starts"] = args.starts
    result["start_to_ready_s"] = round(statistics.median(ready for ready, _ in starts), 2)
    result["start_to_first_prediction_s"] = round(statistics.median(first for _, first in starts), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
