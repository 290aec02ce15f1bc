"""gRPC prediction throughput (unary and bidirectional streaming) beside HTTP, one server, one run.

Against a real ``bentoml serve`` on loopback (open mode, one linear head), with
250x250 JPEGs, at concurrency 1, 8 and 32 (requests in flight), bounded in time:
- gRPC unary ``Predict``: one call per image, ``concurrency`` calls in flight;
- gRPC ``StreamPredict``: one stream, ``concurrency`` images in flight on it;
- HTTP ``POST /v1/predict`` (JSON, base64), ``concurrency`` requests in flight.

    python benchmarks/grpc_load.py           # prints one JSON object last
"""

import argparse
import asyncio
import base64
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
from engine_setup import create_linear_heads

from harness.sample_data import textile_files
from harness.servers import start_server
from service.config import Settings
from service.core import Core
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc

TENANT = "default"


def summary(latencies: list[float], elapsed: float) -> dict:
    return {
        "ips": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "requests": len(latencies),
    }


async def grpc_unary(target: str, jpegs: list[bytes], head: str, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.PredictionServiceStub(channel)
        deadline = time.perf_counter() + seconds

        async def client(worker: int) -> None:
            i = worker
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await stub.Predict(api.PredictRequest(images=[jpegs[i % len(jpegs)]], heads=[head]))
                latencies.append((time.perf_counter() - started) * 1000)
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(client(w) for w in range(concurrency)))
        return summary(latencies, time.perf_counter() - started)


async def grpc_stream(target: str, jpegs: list[bytes], head: str, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    sent_at: dict[str, float] = {}
    window = asyncio.Semaphore(concurrency)
    deadline = time.perf_counter() + seconds

    async def requests():
        i = 0
        while time.perf_counter() < deadline:
            await window.acquire()
            request_id = str(i)
            sent_at[request_id] = time.perf_counter()
            yield api.StreamPredictRequest(request_id=request_id, image=jpegs[i % len(jpegs)], heads=[head])
            i += 1

    async with grpc.aio.insecure_channel(target) as channel:
        started = time.perf_counter()
        async for response in rpc.PredictionServiceStub(channel).StreamPredict(requests()):
            latencies.append((time.perf_counter() - sent_at.pop(response.request_id)) * 1000)
            window.release()
        return summary(latencies, time.perf_counter() - started)


async def http_json(url: str, jpegs: list[bytes], head: str, concurrency: int, seconds: float) -> dict:
    bodies = [json.dumps({"images": [base64.b64encode(j).decode()], "heads": [head]}) for j in jpegs]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as http:

        async def client(worker: int) -> None:
            i = worker
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await http.post(
                    "/v1/predict", content=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
                )
                response.raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(client(w) for w in range(concurrency)))
        return summary(latencies, time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="graft-grpc-load-"))
    [head] = create_linear_heads(Core.open(Settings(data_dir=data_dir), backbones=["mobilenet_v2"]), 1, tenant=TENANT)
    jpegs = [data for _, data, _ in textile_files(per_class=10)]

    server = start_server(data_dir, GRAFT_AUTH="open")
    result: dict = {"seconds_per_level": args.seconds, "image": "250x250 JPEG"}
    try:
        await grpc_unary(server.grpc_target, jpegs, head, 8, 3)  # warm-up
        for concurrency in (1, 8, 32):
            for name, run in (("grpc_unary", grpc_unary), ("grpc_stream", grpc_stream), ("http", http_json)):
                target = server.http_url if name == "http" else server.grpc_target
                level = await run(target, jpegs, head, concurrency, args.seconds)
                result.setdefault(name, {})[f"c{concurrency}"] = level
                print(name, concurrency, level, file=sys.stderr)
    finally:
        server.stop()

    for name in ("grpc_unary", "grpc_stream", "http"):
        result[f"{name}_ips"] = max(level["ips"] for level in result[name].values())
    result["grpc_stream_over_http"] = round(result["grpc_stream_ips"] / result["http_ips"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
