"""Per-tenant quotas hold under concurrent writes (SQLite and PostgreSQL) and the prediction rate refills."""

import threading

import pytest
import torch

from service.config import Settings
from service.errors import ResourceExhausted
from service.jobs.store import JobStore
from service.quotas import PredictionRate, Quotas
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.heads import HeadRegistry
from service.training import TrainRequest


def test_concurrent_writes_of_one_tenant_cannot_both_pass_a_quota_only_one_fits(registry_url, tmp_path):
    quotas = Quotas(Settings(data_dir=tmp_path, quota_head_versions=1))
    registries = [HeadRegistry(Database(registry_url), BlobStore(tmp_path / "blobs"), quotas) for _ in range(2)]
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def create(registry: HeadRegistry, name: str) -> None:
        start.wait()
        try:
            registry.create_version(
                "acme",
                name,
                tensors={"weight": torch.zeros(2, 4)},
                backbone="mobilenet_v2",
                split_point=None,
                kind="linear",
                classes=["a", "b"],
                config={},
                hyperparams={},
                metrics={},
                dataset_id="ds_1",
            )
            outcomes.append("created")
        except ResourceExhausted:
            outcomes.append("refused")

    threads = [threading.Thread(target=create, args=(registry, f"head-{i}")) for i, registry in enumerate(registries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created", "refused"]


def test_the_prediction_rate_refuses_a_burst_over_it_and_says_when_to_retry(tmp_path):
    now = [0.0]
    rate = PredictionRate(
        Settings(data_dir=tmp_path, quota_predict_images_per_s=10, quota_predict_burst=20), clock=lambda: now[0]
    )
    rate.take("acme", 20)
    with pytest.raises(ResourceExhausted) as refused:
        rate.take("acme", 5)
    assert refused.value.retry_after_s == pytest.approx(0.5)
    assert "GRAFT_QUOTA_PREDICT_IMAGES_PER_S" in refused.value.message
    rate.take("other", 20)  # another tenant's bucket is its own
    now[0] = 0.5
    rate.take("acme", 5)  # refilled at 10 images/s


def test_concurrent_job_creations_cannot_queue_more_than_the_quota(registry_url, tmp_path):
    """The count of queued jobs is read inside the transaction that inserts one (SQLite too), so racers serialise."""
    quotas = Quotas(Settings(data_dir=tmp_path, quota_queued_jobs=2))
    stores = [JobStore(Database(registry_url), quotas) for _ in range(4)]  # four replicas
    racers = 8
    start = threading.Barrier(racers)
    outcomes: list[str] = []

    def create(store: JobStore) -> None:
        start.wait()
        try:
            store.create("acme", TrainRequest(dataset_id="ds_1", head_name="h"))
            outcomes.append("created")
        except ResourceExhausted:
            outcomes.append("refused")

    threads = [threading.Thread(target=create, args=(stores[i % len(stores)],)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created"] * 2 + ["refused"] * (racers - 2)
