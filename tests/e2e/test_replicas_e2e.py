"""Replicas behind a load balancer act as one service, tested for real.

A real PostgreSQL, two ``bentoml serve`` replicas sharing it and one data folder, and nginx running
``deploy/nginx.conf`` in front, all on loopback (harness/cluster.py). Calls go through nginx, except where a
test talks to one replica on purpose. The tests run in file order: the last two kill and drain replicas.
"""

import asyncio
import base64
import signal
import time

import grpc
import httpx
import pytest
import sqlalchemy as sa

from harness.cluster import Cluster, LoadResult, retrying_predictions, start_cluster
from harness.sample_data import textile_files
from harness.servers import make_tenant_key, wait_for_job
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc

QUICK = {"search": {"lr": [1.0], "weight_decay": [0.01]}}
LEASE_S = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(
        tmp_path_factory.mktemp("replicas"),
        GRAFT_JOB_LEASE_S=str(LEASE_S),
        GRAFT_QUOTA_QUEUED_JOBS="100",
        GRAFT_SHUTDOWN_GRACE_S="20",
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def key(cluster: Cluster) -> str:
    return make_tenant_key(cluster.replicas[0], "acme")


@pytest.fixture(scope="module")
def client(cluster: Cluster, key: str):
    with httpx.Client(base_url=cluster.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        yield client


def replica_client(cluster: Cluster, index: int, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=cluster.replicas[index].http_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def registry(cluster: Cluster) -> sa.Engine:
    return sa.create_engine(cluster.postgres.url)


def upload_http(client: httpx.Client, examples, name: str) -> dict:
    files = [("files", (file_name, data, "image/jpeg")) for file_name, data, _ in examples]
    response = client.post(
        "/v1/datasets", data={"display_name": name, "labels": [label for *_, label in examples]}, files=files
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def dataset(client: httpx.Client) -> dict:
    return upload_http(client, textile_files(per_class=12), "textiles")


def predict(client: httpx.Client, ref: str, image: bytes) -> httpx.Response:
    return client.post("/v1/predict", json={"images": [base64.b64encode(image).decode()], "heads": [ref]})


def test_uploads_over_both_doors_train_and_predict_through_the_load_balancer(cluster, key, client, dataset):
    examples = textile_files(per_class=6, offset=50)

    def messages():
        yield api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name="over-grpc"))
        for file_name, data, label in examples:
            yield api.CreateDatasetRequest(
                image=api.CreateDatasetRequest.Image(file_name=file_name, label=label, data=data)
            )

    with grpc.insecure_channel(cluster.grpc_target) as channel:
        over_grpc = rpc.DatasetServiceStub(channel).CreateDataset(
            messages(), metadata=[("authorization", f"Bearer {key}")], timeout=120
        )
    assert dict(over_grpc.examples_per_class) == {"global": 6, "local": 6, "nominal": 6}
    for replica in range(2):  # stored once, visible from every replica
        with replica_client(cluster, replica, key) as direct:
            assert direct.get(f"/v1/{dataset['name']}").status_code == 200
            assert direct.get(f"/v1/{over_grpc.name}").status_code == 200

    job = client.post("/v1/jobs", json={"dataset": dataset["name"], "head": "weave", **QUICK}).json()
    events = []  # followed through nginx, whichever replica runs the job
    with client.stream("GET", f"/v1/{job['name']}:watch") as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert '"state":"succeeded"' in events[-1].replace(" ", "")
    _, image, label = textile_files(per_class=1, offset=300)[0]
    for _ in range(4):  # round-robin: both replicas answer
        response = predict(client, "weave", image)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["heads"][0]["version"] == 1


def test_an_alias_moved_and_a_version_deleted_on_one_replica_are_seen_by_the_other_at_once(
    cluster, key, client, dataset
):
    for _ in range(2):
        job = client.post("/v1/jobs", json={"dataset": dataset["name"], "head": "shared", **QUICK}).json()
        assert wait_for_job(client, job["name"])["state"] == "succeeded"
    _, image, _ = textile_files(per_class=1, offset=301)[0]
    with replica_client(cluster, 0, key) as first, replica_client(cluster, 1, key) as second:
        for version in (1, 2):  # warm both replicas' caches on both versions
            for replica in (first, second):
                assert predict(replica, f"shared@{version}", image).status_code == 200
        for version in (1, 2, 1):
            assert first.put("/v1/heads/shared/aliases/prod", json={"version": version}).status_code == 200
            answer = predict(second, "shared:prod", image).json()
            assert answer["predictions"][0]["heads"][0]["version"] == version
        assert first.delete("/v1/heads/shared/versions/1").status_code == 204
        assert predict(second, "shared@1", image).status_code == 404
        assert predict(second, "shared:prod", image).status_code == 404  # the alias went with its version
        assert predict(second, "shared", image).json()["predictions"][0]["heads"][0]["version"] == 2


def test_twenty_jobs_each_run_exactly_once_across_the_replicas(cluster, client, dataset):
    names = []
    for i in range(20):
        response = client.post("/v1/jobs", json={"dataset": dataset["name"], "head": f"many-{i}", **QUICK})
        assert response.status_code == 202, response.text
        names.append(response.json()["name"])
    jobs = [wait_for_job(client, name) for name in names]
    ids = [name.removeprefix("jobs/") for name in names]
    assert [job["state"] for job in jobs] == ["succeeded"] * 20
    with registry(cluster).connect() as db:
        rows = db.execute(sa.text("SELECT id, attempts, worker FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}).all()
        versions = db.execute(
            sa.text("SELECT job_id, count(*) FROM head_versions WHERE job_id = ANY(:ids) GROUP BY job_id"), {"ids": ids}
        ).all()
    assert sorted(attempts for _, attempts, _ in rows) == [1] * 20  # claimed once, never retried
    assert dict(versions) == {job_id: 1 for job_id in ids}  # one head version per job: published once


def test_a_finetune_job_on_a_killed_replica_is_finished_by_the_other(cluster, client, dataset, tmp_path):
    spec = {
        "kind": "finetune",
        "finetune_blocks": 2,
        "search": {"lr": [1e-3], "weight_decay": [1e-4]},
        "hyperparams": {"lr": 1e-3, "weight_decay": 1e-4, "epochs": 60, "batch_size": 8, "patience": 60},
    }
    job = client.post("/v1/jobs", json={"dataset": dataset["name"], "head": "tuned", **spec}).json()
    engine = registry(cluster)
    deadline = time.monotonic() + 120
    worker = None
    while worker is None and time.monotonic() < deadline:
        with engine.connect() as db:
            state, worker = db.execute(
                sa.text("SELECT state, worker FROM jobs WHERE id = :id"), {"id": job["name"].removeprefix("jobs/")}
            ).one()
        if state != "running":
            worker = None
            time.sleep(0.2)
    assert worker is not None, "the job never started"
    victim = cluster.replica_of_worker(worker)
    cluster.kill(victim)

    finished = wait_for_job(client, job["name"], timeout_s=600)
    assert finished["state"] == "succeeded", finished
    with engine.connect() as db:
        attempts, last_worker = db.execute(
            sa.text("SELECT attempts, worker FROM jobs WHERE id = :id"), {"id": job["name"].removeprefix("jobs/")}
        ).one()
    assert attempts == 2 and last_worker != worker
    cluster.replace(victim, tmp_path / "replacement")


def test_a_replica_drained_with_sigterm_under_load_fails_no_request_of_a_retrying_client(cluster, key):
    _, image, _ = textile_files(per_class=1, offset=302)[0]

    async def run() -> LoadResult:
        stop = asyncio.Event()
        load = asyncio.create_task(
            retrying_predictions(cluster.http_url, cluster.grpc_target, key, image, "weave", 4, stop)
        )
        await asyncio.sleep(3)
        drained = cluster.replicas[0]
        drained.process.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient(timeout=10) as probe:  # readiness until it is gone
            while drained.process.poll() is None:
                try:
                    readiness.append((await probe.get(f"{drained.http_url}/readyz")).status_code)
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        await asyncio.to_thread(drained.process.wait, 60)  # exits on its own (TimeoutExpired otherwise)
        await asyncio.sleep(3)  # the survivor carries the load alone
        stop.set()
        return await load

    readiness: list[int] = []
    result = asyncio.run(run())
    assert result.failed == 0, result
    assert result.ok > 20, result
    # the signal reaches the worker through `bentoml serve` a moment after it is sent; from then on, not ready
    assert 503 in readiness and 200 not in readiness[readiness.index(503) :], readiness
