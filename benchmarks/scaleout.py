"""Replicas behind nginx: throughput with one and two replicas, exactly-once jobs, failover and drain, one run.

The deployment's topology on loopback (harness/cluster.py): a real PostgreSQL, two ``bentoml serve``
replicas sharing it and one data folder, nginx running deploy/nginx.conf. Bounded in time, stops by itself.

- ``lb_ips_1_replica`` / ``lb_ips_2_replicas``: prediction images/s through nginx (HTTP + gRPC, one 250x250
  JPEG per request) with nginx sending to one replica, then to both. On one machine both replicas share its
  cores, so two cannot beat one here; on separate machines the second replica adds its own machine's throughput.
- ``duplicate_job_runs``: 20 jobs submitted through nginx; runs beyond one per job (target 0).
- ``job_takeover_s``: SIGKILL of the replica running a finetune job until that job runs again on the other
  (the lease, ``GRAFT_JOB_LEASE_S``, set to 5 s here, is most of it).
- ``drain_failed_requests``: SIGTERM to a replica under prediction load; requests that failed for a client that
  retries on 502/503/UNAVAILABLE (target 0).
- ``head_resolve_ms``: what "one view of heads from every replica" costs a prediction: the median time to resolve
  a head reference against the PostgreSQL registry, which every prediction does for each head it names.

    python benchmarks/scaleout.py        # prints one JSON object last
"""

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

from harness.cluster import Cluster, retrying_predictions, start_cluster
from harness.sample_data import textile_files
from harness.servers import make_tenant_key, wait_for_job
from service.config import Settings
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.heads import HeadRegistry

LEASE_S = 5
QUICK = {"search": {"lr": [1.0], "weight_decay": [0.01]}}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def throughput(cluster: Cluster, key: str, image: bytes, seconds: float, concurrency: int) -> dict:
    async def run():
        stop = asyncio.Event()
        load = asyncio.create_task(
            retrying_predictions(cluster.http_url, cluster.grpc_target, key, image, "probe", concurrency, stop)
        )
        await asyncio.sleep(seconds)
        stop.set()
        return await load

    result = asyncio.run(run())
    return {
        "ips": round(result.ok / seconds, 2),
        "failed": result.failed,
        "p50_ms": round(float(np.percentile(result.latencies_ms, 50)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="per throughput measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graft-scaleout-") as tmp:
        cluster = start_cluster(
            Path(tmp),
            GRAFT_JOB_LEASE_S=str(LEASE_S),
            GRAFT_QUOTA_QUEUED_JOBS="100",
            GRAFT_QUOTA_PREDICT_IMAGES_PER_S="100000",
            GRAFT_QUOTA_PREDICT_BURST="100000",
        )
        try:
            print(json.dumps(measure(cluster, Path(tmp), args.seconds, args.concurrency)))
        finally:
            cluster.stop()


def measure(cluster: Cluster, root: Path, seconds: float, concurrency: int) -> dict:
    key = make_tenant_key(cluster.replicas[0], "bench")
    client = httpx.Client(base_url=cluster.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    files = [("files", (name, data, "image/jpeg")) for name, data, _ in textile_files(per_class=12)]
    labels = [label for *_, label in textile_files(per_class=12)]
    dataset = client.post("/v1/datasets", data={"display_name": "bench", "labels": labels}, files=files).json()["name"]
    wait_for_job(client, client.post("/v1/jobs", json={"dataset": dataset, "head": "probe", **QUICK}).json()["name"])
    _, image, _ = textile_files(per_class=1, offset=300)[0]

    both = list(cluster.replicas)
    log(f"throughput through nginx, {seconds:g} s each, concurrency {concurrency}")
    cluster.nginx.reconfigure(both[:1])
    one = throughput(cluster, key, image, seconds, concurrency)
    cluster.nginx.reconfigure(both)
    two = throughput(cluster, key, image, seconds, concurrency)

    registry = HeadRegistry(
        Database(cluster.postgres.url),
        BlobStore(cluster.data_dir / "blobs"),
        Quotas(Settings(data_dir=cluster.data_dir)),
    )
    resolve_ms = []
    for _ in range(200):
        started = time.perf_counter()
        registry.resolve("bench", "probe")
        resolve_ms.append((time.perf_counter() - started) * 1000)

    log("20 jobs through nginx")
    jobs = [client.post("/v1/jobs", json={"dataset": dataset, "head": f"job-{i}", **QUICK}).json() for i in range(20)]
    ids = [job["name"].removeprefix("jobs/") for job in jobs]
    for job_id in ids:
        wait_for_job(client, f"jobs/{job_id}")
    engine = sa.create_engine(cluster.postgres.url)
    with engine.connect() as db:
        runs = db.execute(
            sa.text("SELECT coalesce(sum(attempts), 0) FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}
        ).scalar()
        versions = db.execute(
            sa.text("SELECT count(*) FROM head_versions WHERE job_id = ANY(:ids)"), {"ids": ids}
        ).scalar()
    duplicate_runs = int(runs) - len(ids) + max(0, int(versions) - len(ids))

    log("SIGKILL the replica running a finetune job")
    spec = {
        "kind": "finetune",
        "finetune_blocks": 2,
        "search": {"lr": [1e-3], "weight_decay": [1e-4]},
        "hyperparams": {"lr": 1e-3, "weight_decay": 1e-4, "epochs": 60, "batch_size": 8, "patience": 60},
    }
    job_id = (
        client.post("/v1/jobs", json={"dataset": dataset, "head": "tuned", **spec}).json()["name"].removeprefix("jobs/")
    )
    worker = poll_job(engine, job_id, lambda state, worker, attempts: state == "running" and worker)
    victim = cluster.replica_of_worker(worker)
    killed = time.monotonic()
    cluster.kill(victim)
    poll_job(engine, job_id, lambda state, w, attempts: state == "running" and attempts == 2 and w != worker)
    takeover_s = time.monotonic() - killed
    final = wait_for_job(client, f"jobs/{job_id}")
    cluster.replace(victim, root / "replacement")

    log("SIGTERM a replica under load")

    async def drain():
        stop = asyncio.Event()
        load = asyncio.create_task(
            retrying_predictions(cluster.http_url, cluster.grpc_target, key, image, "probe", concurrency, stop)
        )
        await asyncio.sleep(3)
        drained = cluster.replicas[0]
        started = time.monotonic()
        drained.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(drained.process.wait, 120)
        exited = time.monotonic() - started
        await asyncio.sleep(3)
        stop.set()
        return await load, exited

    drained, exit_s = asyncio.run(drain())
    client.close()
    return {
        "lb_ips_1_replica": one["ips"],
        "lb_ips_2_replicas": two["ips"],
        "duplicate_job_runs": duplicate_runs,
        "job_takeover_s": round(takeover_s, 1),
        "drain_failed_requests": drained.failed,
        "drain_retried_requests": drained.retried,
        "drain_ok_requests": drained.ok,
        "drain_exit_s": round(exit_s, 1),
        "taken_over_job_state": final["state"],
        "lb_p50_ms_1_replica": one["p50_ms"],
        "lb_p50_ms_2_replicas": two["p50_ms"],
        "head_resolve_ms": round(float(np.median(resolve_ms)), 2),
        "job_lease_s": LEASE_S,
        "concurrency": concurrency,
    }


def poll_job(engine: sa.Engine, job_id: str, until, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with engine.connect() as db:
            state, worker, attempts = db.execute(
                sa.text("SELECT state, worker, attempts FROM jobs WHERE id = :id"), {"id": job_id}
            ).one()
        if until(state, worker, attempts):
            return worker
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} never reached the awaited state (last: {state}, {worker}, {attempts})")


if __name__ == "__main__":
    main()
