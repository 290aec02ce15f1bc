"""graft as the container it ships: image size, cold starts, rolling replacement, job takeover, the role split.

The topology of deploy/compose.yaml on loopback (harness/containers.py): two serving containers
(``GRAFT_ROLE=serve``) behind nginx running deploy/nginx.conf, one training container (``GRAFT_ROLE=train``),
a real PostgreSQL and one shared data folder; serving pinned to one core, training to the other. One run,
bounded in time, stops by itself.

- ``image_bytes``: the image ``make image`` builds (built first if its inputs changed).
- ``container_start_to_ready_s`` / ``container_start_to_first_prediction_s``: ``podman run`` of one container
  until ``/readyz`` answers 200 / until a prediction through the built-in ``imagenet@mobilenet_v2`` head
  answers; median of 3 cold starts. ``process_start_to_ready_s``: the same start for ``bentoml serve`` outside
  a container, same settings, alternated with the container starts in the same run.
- ``serving_p99_during_training_over_idle``: p99 of predictions through nginx (2 in flight, HTTP and gRPC) while
  the training container runs a finetune job, over the p99 of the same load before and after it (pooled).
- ``kill9_job_takeover_s``: SIGKILL of the training container running a job until that job runs again on a
  replacement training container (its start, and the lease ``GRAFT_JOB_LEASE_S`` = 5 s here).
- ``rolling_replace_failed_requests``: each container replaced in turn (start the new one, put it behind nginx,
  SIGTERM the old one: it drains) while a client predicts continuously, retrying 502/503/UNAVAILABLE.

    python benchmarks/container.py        # prints one JSON object last
"""

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from harness.cluster import LoadResult, predict_for
from harness.containers import IMAGE_UID, Fleet, build_image, run_container, start_fleet
from harness.sample_data import textile_files
from harness.servers import make_tenant_key, start_server, wait_for_job

LEASE_S = 5
FINETUNE = {
    "kind": "finetune",
    "finetune_blocks": 2,
    "search": {"lr": [1e-3], "weight_decay": [1e-4]},
    "hyperparams": {"lr": 1e-3, "weight_decay": 1e-4, "epochs": 200, "batch_size": 8, "patience": 200},
}
OPEN = {"GRAFT_AUTH": "open", "GRAFT_DEVICE": "cpu", "GRAFT_BACKBONES": '["mobilenet_v2"]'}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def first_prediction(url: str, image: bytes, started: float, timeout_s: float = 300) -> float:
    body = {"images": [base64.b64encode(image).decode()], "heads": ["imagenet@mobilenet_v2"]}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}/v1/predict", json=body, timeout=10).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no prediction from {url} within {timeout_s:g} s")


def cold_starts(image_tag: str, root: Path, image: bytes, rounds: int) -> dict:
    """Alternate container and process starts (one core's worth of noise hits both alike)."""
    container_ready, container_first, process_ready = [], [], []
    for i in range(rounds):
        data = root / f"cold-{i}"
        data.mkdir()
        (data / "container").mkdir()
        (data / "process").mkdir()
        os.chown(data / "container", IMAGE_UID, IMAGE_UID)
        container = run_container(image_tag, "both", data / "container", OPEN, name_prefix="graft-bench")
        try:
            container_ready.append(container.wait_until("/readyz"))
            container_first.append(first_prediction(container.http_url, image, container.started_at))
        finally:
            container.stop(grace_s=10)
        started = time.monotonic()
        server = start_server(data / "process", **OPEN)
        process_ready.append(time.monotonic() - started)
        server.stop()
        log(f"cold start {i + 1}: container ready {container_ready[-1]:.1f} s, process ready {process_ready[-1]:.1f} s")
    return {
        "container_start_to_ready_s": round(statistics.median(container_ready), 2),
        "container_start_to_first_prediction_s": round(statistics.median(container_first), 2),
        "process_start_to_ready_s": round(statistics.median(process_ready), 2),
        "container_ready_runs_s": [round(s, 2) for s in container_ready],
        "process_ready_runs_s": [round(s, 2) for s in process_ready],
    }


def job_state(fleet: Fleet, job: str) -> tuple[str, str]:
    with sa.create_engine(fleet.postgres.url).connect() as db:
        state, worker = db.execute(
            sa.text("SELECT state, worker FROM jobs WHERE id = :id"), {"id": job.removeprefix("jobs/")}
        ).one()
    return state, worker or ""


def wait_running(fleet: Fleet, job: str, on: str, timeout_s: float = 300) -> float:
    """Until ``job`` runs in container ``on``; returns when (time.monotonic())."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, worker = job_state(fleet, job)
        if state == "running" and worker.split(":")[0] == on:
            return time.monotonic()
        time.sleep(0.1)
    raise TimeoutError(f"{job} did not run on {on} within {timeout_s:g} s")


def role_split(fleet: Fleet, client: httpx.Client, key: str, dataset: str, image: bytes, seconds: float) -> dict:
    """Serving p99 idle, during a finetune job on the training container, idle again."""
    before = predict_for(fleet.http_url, fleet.grpc_target, key, image, "probe", 2, seconds)
    job = client.post("/v1/jobs", json={"dataset": dataset, "head": "busy", **FINETUNE}).json()["name"]
    wait_running(fleet, job, fleet.training[0].name)
    during = predict_for(fleet.http_url, fleet.grpc_target, key, image, "probe", 2, seconds)
    still_running = job_state(fleet, job)[0] == "running"
    client.post(f"/v1/{job}:cancel")
    wait_for_job(client, job)
    after = predict_for(fleet.http_url, fleet.grpc_target, key, image, "probe", 2, seconds)
    idle = LoadResult(latencies_ms=before.latencies_ms + after.latencies_ms)
    return {
        "serving_p99_during_training_over_idle": round(during.p99_ms() / idle.p99_ms(), 3),
        "serving_p99_idle_ms": idle.p99_ms(),
        "serving_p99_during_training_ms": during.p99_ms(),
        "serving_ips_idle": round((before.ok + after.ok) / (2 * seconds), 2),
        "serving_ips_during_training": round(during.ok / seconds, 2),
        "job_ran_throughout": still_running,
        "failed_requests_role_split": before.failed + during.failed + after.failed,
    }


def takeover(fleet: Fleet, client: httpx.Client, dataset: str) -> dict:
    job = client.post("/v1/jobs", json={"dataset": dataset, "head": "taken-over", **FINETUNE}).json()["name"]
    victim = fleet.training[0]
    wait_running(fleet, job, victim.name)
    time.sleep(2)
    killed = time.monotonic()
    replacement = fleet.crash_and_replace(victim)
    resumed = wait_running(fleet, job, replacement.name)
    client.post(f"/v1/{job}:cancel")
    return {"kill9_job_takeover_s": round(resumed - killed, 2), "job_lease_s": LEASE_S}


def rolling_replace(fleet: Fleet, key: str, image: bytes) -> dict:
    result = fleet.replace_all_under_load(key, image, "probe")
    return {
        "rolling_replace_failed_requests": result.failed,
        "rolling_replace_ok_requests": result.ok,
        "rolling_replace_retried_requests": result.retried,
        "rolling_replace_failures": result.failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20, help="length of each latency phase")
    args = parser.parse_args()

    built = build_image()
    log(f"image {built['image']}: {built['bytes'] / 1e9:.2f} GB ({'built' if built['built'] else 'cached'})")
    result: dict = {"image_bytes": built["bytes"]}
    _, image, _ = textile_files(per_class=1, offset=300)[0]
    with tempfile.TemporaryDirectory(prefix="graft-bench-container-") as tmp:
        root = Path(tmp)
        result |= cold_starts(built["image"], root, image, args.cold_starts)
        cores = sorted(os.sched_getaffinity(0))
        fleet = start_fleet(
            built["image"],
            root / "fleet",
            serve_cpus=str(cores[0]),
            train_cpus=str(cores[-1]),
            GRAFT_JOB_LEASE_S=str(LEASE_S),
            GRAFT_SHUTDOWN_GRACE_S="20",
        )
        try:
            key = make_tenant_key(fleet.serving[0], "bench")  # type: ignore[arg-type]
            with httpx.Client(
                base_url=fleet.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=300
            ) as client:
                files = [("files", (name, data, "image/jpeg")) for name, data, _ in textile_files(per_class=20)]
                labels = [label for *_, label in textile_files(per_class=20)]
                dataset = client.post(
                    "/v1/datasets", data={"display_name": "bench", "labels": labels}, files=files
                ).json()["name"]
                probe = client.post("/v1/jobs", json={"dataset": dataset, "head": "probe"}).json()["name"]
                assert wait_for_job(client, probe)["state"] == "succeeded"
                result |= role_split(fleet, client, key, dataset, image, args.seconds)
                log(f"role split: {result['serving_p99_during_training_over_idle']}")
                result |= takeover(fleet, client, dataset)
                log(f"takeover: {result['kill9_job_takeover_s']} s")
            result |= rolling_replace(fleet, key, image)
        finally:
            fleet.stop()
    result["cores"] = len(os.sched_getaffinity(0))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
