"""A batch prediction across a replica kill finishes once, with complete results (issue 26, part 4).

A real PostgreSQL, two ``bentoml serve`` replicas sharing it and one data folder, and nginx in front
(harness/cluster.py). The replica running the job is killed (SIGKILL) once it stored a chunk; the other
requeues the job when its lease expires, resumes at the checkpoint, and the results hold every image once.
"""

import json
import time

import httpx
import pytest
import sqlalchemy as sa

from harness.cluster import Cluster, start_cluster
from harness.sample_data import textile_files
from harness.servers import make_tenant_key, wait_for_job

LEASE_S = 3
CHUNK = 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(
        tmp_path_factory.mktemp("batch"), GRAFT_JOB_LEASE_S=str(LEASE_S), GRAFT_BATCH_CHUNK_IMAGES=str(CHUNK)
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster):
    key = make_tenant_key(cluster.replicas[0], "acme")
    with httpx.Client(base_url=cluster.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        yield client


def test_a_batch_prediction_across_a_replica_kill_finishes_once_with_complete_results(cluster, client, tmp_path):
    examples = textile_files(per_class=200)
    files = [("files", (name, data, "image/jpeg")) for name, data, _ in examples]
    uploaded = client.post(
        "/v1/datasets", data={"display_name": "textiles", "labels": [e[2] for e in examples]}, files=files
    )
    assert uploaded.status_code == 201, uploaded.text
    spec = {"dataset": uploaded.json()["name"], "heads": ["imagenet@mobilenet_v2"], "top_k": 2}
    created = client.post("/v1/batchPredictions", json=spec)
    assert created.status_code == 202, created.text
    batch_id = created.json()["name"].removeprefix("batchPredictions/")
    engine = sa.create_engine(cluster.postgres.url)
    read = sa.text("SELECT state, worker, done FROM batch_predictions WHERE id = :id")
    deadline = time.monotonic() + 300
    worker = None
    while worker is None and time.monotonic() < deadline:
        with engine.connect() as db:
            state, running_on, done = db.execute(read, {"id": batch_id}).one()
        assert state in ("queued", "running"), f"the job ended ({state}) before a replica could be killed"
        if state == "running" and done >= CHUNK:
            worker = running_on
        else:
            time.sleep(0.05)
    assert worker is not None, "the job never stored a chunk"
    victim = cluster.replica_of_worker(worker)
    cluster.kill(victim)

    finished = wait_for_job(client, created.json()["name"], timeout_s=600)
    results = client.get(f"/v1/batchPredictions/{batch_id}/results")
    with engine.connect() as db:
        attempts, last_worker = db.execute(
            sa.text("SELECT attempts, worker FROM batch_predictions WHERE id = :id"), {"id": batch_id}
        ).one()
        stored = db.execute(
            sa.text("SELECT count(*) FROM batch_prediction_results WHERE batch_id = :id"), {"id": batch_id}
        ).scalar_one()
    assert (finished["state"], finished["images_done"], finished["images_total"]) == (
        "succeeded",
        len(examples),
        len(examples),
    ), finished
    assert attempts == 2 and last_worker != worker
    rows = [json.loads(line) for line in results.text.splitlines()]
    assert stored == len(rows) == len(examples)
    assert [row["index"] for row in rows] == list(range(len(examples)))
    assert [row["file_name"] for row in rows] == [name for name, _, _ in examples]
    assert all(len(row["heads"]) == 1 and len(row["heads"][0]["top"]) == 2 for row in rows)
    cluster.replace(victim, tmp_path / "replacement")
