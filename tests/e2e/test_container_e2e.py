"""graft run as the image it ships: containers on PostgreSQL behind nginx, the topology of deploy/compose.yaml.

``make image`` builds the image (here through ``harness.containers.build_image``: it is built once per set of
inputs, so a fresh clone builds it). Two serving containers (``GRAFT_ROLE=serve``) behind nginx running
``deploy/nginx.conf`` and one training container (``GRAFT_ROLE=train``) share a real PostgreSQL and one data
folder mounted as the image's volume; on a machine with two cores or more the serving and training containers are
pinned to different cores. Calls go through nginx. The tests run in file order: the last ones kill and replace
containers.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from packaging.utils import canonicalize_name

from harness.cluster import predict_for
from harness.containers import IMAGE_UID, Fleet, build_image, podman, start_fleet
from harness.sample_data import textile_files
from harness.servers import make_tenant_key, wait_for_job
from tests.unit.test_lock import locked

LEASE_S = 5
GRAFT = Path(sys.executable).parent / "graft"
LONG_FINETUNE = {
    "kind": "finetune",
    "finetune_blocks": 2,
    "search": {"lr": [1e-3], "weight_decay": [1e-4]},
    "hyperparams": {"lr": 1e-3, "weight_decay": 1e-4, "epochs": 60, "batch_size": 8, "patience": 60},
}


def core_split() -> tuple[str | None, str | None]:
    """Serving on the first core the tests may use, training on the second (no pinning on one core)."""
    cores = sorted(os.sched_getaffinity(0))
    return (str(cores[0]), str(cores[1])) if len(cores) >= 2 else (None, None)


@pytest.fixture(scope="module")
def image() -> dict:
    return build_image()


@pytest.fixture(scope="module")
def fleet(image, tmp_path_factory):
    serve_cpus, train_cpus = core_split()
    fleet = start_fleet(
        image["image"],
        tmp_path_factory.mktemp("containers"),
        serve_cpus=serve_cpus,
        train_cpus=train_cpus,
        GRAFT_JOB_LEASE_S=str(LEASE_S),
        GRAFT_SHUTDOWN_GRACE_S="20",
    )
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def key(fleet: Fleet) -> str:
    return make_tenant_key(fleet.serving[0], "acme")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(fleet: Fleet, key: str):
    with httpx.Client(base_url=fleet.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        yield client


def job_row(fleet: Fleet, job_name: str) -> sa.Row:
    with sa.create_engine(fleet.postgres.url).connect() as db:
        return db.execute(
            sa.text("SELECT state, worker, attempts FROM jobs WHERE id = :id"), {"id": job_name.removeprefix("jobs/")}
        ).one()


def container_of(worker: str) -> str:
    """The container a job's worker (``host:pid:nonce``) ran in: containers are named as their host."""
    return worker.split(":")[0]


def graft_cli(fleet: Fleet, key: str, *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "GRAFT_URL": fleet.http_url, "GRAFT_API_KEY": key}
    result = subprocess.run([str(GRAFT), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"graft {' '.join(args)}: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def test_the_image_holds_exactly_the_locked_packages(image):
    listed = podman("run", "--rm", "--entrypoint", "python3", image["image"], "-m", "pip", "list", "--format", "json")
    installed = {canonicalize_name(package["name"]): package["version"] for package in json.loads(listed.stdout)}
    assert installed.pop("graft") == image["image"].split(":")[1]
    installed.pop("pip")  # the venv's own installer, from Debian's python3-venv
    assert installed == locked()


def test_the_image_runs_unprivileged_on_a_read_only_root_with_its_ports_and_health_check(fleet: Fleet, image):
    inspected = json.loads(podman("image", "inspect", image["image"]).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert {"3000/tcp", "50051/tcp"} <= set(config["ExposedPorts"])
    assert "/livez" in " ".join(inspected["Healthcheck"]["Test"])
    assert list(config["Volumes"]) == ["/var/lib/graft"]
    name = fleet.serving[0].name
    assert podman("exec", name, "id", "-u").stdout.strip() == str(IMAGE_UID)
    refused = podman("exec", name, "touch", "/opt/graft/written", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    assert podman("healthcheck", "run", name, check=False).returncode == 0  # the image's own check passes


def test_a_training_container_is_alive_but_never_ready_for_predictions(fleet: Fleet):
    trainer = fleet.training[0]
    assert httpx.get(f"{trainer.http_url}/livez").status_code == 200
    assert httpx.get(f"{trainer.http_url}/readyz").status_code == 503
    for serving in fleet.serving:
        assert httpx.get(f"{serving.http_url}/readyz").status_code == 200


def test_the_cli_quickstart_through_nginx_trains_on_the_training_container(fleet: Fleet, key, client, tmp_path):
    folder = tmp_path / "textiles"
    for file_name, data, _ in textile_files(per_class=10):
        (folder / file_name).parent.mkdir(parents=True, exist_ok=True)
        (folder / file_name).write_bytes(data)
    assert "3 classes" in graft_cli(fleet, key, "upload", str(folder), "--name", "textiles")
    finished = json.loads(
        graft_cli(fleet, key, "train", "textiles", "--head", "textiles", "--json", "--hyperparams", '{"epochs": 10}')
    )
    assert finished["state"] == "succeeded", finished
    state, worker, _ = job_row(fleet, finished["name"])
    assert container_of(worker) == fleet.training[0].name  # never a serving container

    held_out = tmp_path / "held-out"
    for file_name, data, _ in textile_files(per_class=1, offset=400):
        (held_out / file_name).parent.mkdir(parents=True, exist_ok=True)
        (held_out / file_name).write_bytes(data)
    answers = [
        json.loads(line) for line in graft_cli(fleet, key, "predict", "textiles", str(held_out), "--json").splitlines()
    ]
    assert len(answers) == 3
    assert {answer["heads"][0]["top"][0]["label"] for answer in answers} <= {"nominal", "local", "global"}

    exported = tmp_path / "textiles.onnx"
    graft_cli(fleet, key, "export", "textiles", "--format", "onnx", "-o", str(exported))
    assert exported.stat().st_size > 1_000_000  # backbone + head, checked by the server before it was sent


def test_serving_containers_do_no_training_work_while_a_job_trains(fleet: Fleet, client, key):
    """While the training container trains, the serving containers spend the CPU of serving and nothing more.
    (The p99 ratio this leads to is measured by benchmarks/container.py, not asserted here.)"""
    _, image, _ = textile_files(per_class=1, offset=300)[0]
    dataset = next(d for d in client.get("/v1/datasets").json()["datasets"] if d["display_name"] == "textiles")

    def cpu_seconds() -> float:
        return sum(container.cpu_seconds() for container in fleet.serving)

    before = cpu_seconds()
    idle = predict_for(fleet.http_url, fleet.grpc_target, key, image, "textiles", 2, 8)
    idle_cpu_per_answer = (cpu_seconds() - before) / idle.ok

    job = client.post("/v1/jobs", json={"dataset": dataset["name"], "head": "busy", **LONG_FINETUNE}).json()
    while job_row(fleet, job["name"]).state != "running":
        time.sleep(0.2)
    before = cpu_seconds()
    busy = predict_for(fleet.http_url, fleet.grpc_target, key, image, "textiles", 2, 8)
    busy_cpu_per_answer = (cpu_seconds() - before) / busy.ok
    assert job_row(fleet, job["name"]).state == "running"  # the whole measurement ran beside training
    assert idle.failed == busy.failed == 0
    assert container_of(job_row(fleet, job["name"]).worker) == fleet.training[0].name
    assert busy_cpu_per_answer < 1.5 * idle_cpu_per_answer, (idle_cpu_per_answer, busy_cpu_per_answer)
    client.post(f"/v1/{job['name']}:cancel")
    print(json.dumps({"p99_idle_ms": idle.p99_ms(), "p99_during_training_ms": busy.p99_ms()}))


def test_a_killed_training_container_is_replaced_and_its_job_taken_over(fleet: Fleet, client):
    dataset = next(d for d in client.get("/v1/datasets").json()["datasets"] if d["display_name"] == "textiles")
    job = client.post("/v1/jobs", json={"dataset": dataset["name"], "head": "tuned", **LONG_FINETUNE}).json()
    deadline = time.monotonic() + 120
    while job_row(fleet, job["name"]).state != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    victim = fleet.training[0]
    assert container_of(job_row(fleet, job["name"]).worker) == victim.name
    replacement = fleet.crash_and_replace(victim)

    finished = wait_for_job(client, job["name"], timeout_s=600)
    assert finished["state"] == "succeeded", finished
    _, worker, attempts = job_row(fleet, job["name"])
    assert attempts == 2 and container_of(worker) == replacement.name
    versions = client.get("/v1/heads/tuned").json()["versions"]
    assert len(versions) == 1  # published once


def test_replacing_every_container_in_turn_fails_no_request_of_a_predicting_client(fleet: Fleet, key):
    _, image, _ = textile_files(per_class=1, offset=302)[0]
    result = fleet.replace_all_under_load(key, image, "textiles")
    assert result.failed == 0, result
    assert result.ok > 20, result
    for container in fleet.retired[-3:]:
        assert not container.running()
