"""A job publishes at most one head version, however often it runs (SQLite and a real PostgreSQL).

Publishing and finishing are separate transactions: a replica that stalls or dies between them leaves a
running job with a published version; the job is requeued and run again. That run must find the version,
not store a second one (which would move ``latest`` and charge the quota twice).
"""

from datetime import timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select, update

from service.config import Settings
from service.jobs.store import Holder, JobStore, LeaseLost
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.db import Database, HeadVersionRow, JobRow, utcnow
from service.store.heads import HeadRegistry, HeadVersionInfo
from service.training import TrainRequest

TENANT = "acme"
LEASE_S = 60.0


@pytest.fixture
def parts(registry_url: str, tmp_path: Path) -> tuple[JobStore, HeadRegistry]:
    db, quotas = Database(registry_url), Quotas(Settings(data_dir=tmp_path))
    return JobStore(db, quotas), HeadRegistry(db, BlobStore(tmp_path / "blobs"), quotas)


def publish(store: JobStore, heads: HeadRegistry, holder: Holder) -> HeadVersionInfo:
    """What the trainer does at the end of a job's run: store the version under the run's guard."""
    return heads.create_version(
        TENANT,
        "h",
        tensors={"weight": torch.zeros(2, 4)},
        backbone="mobilenet_v2",
        split_point=None,
        kind="linear",
        classes=["a", "b"],
        config={},
        hyperparams={},
        metrics={"accuracy": 0.5},
        dataset_id="ds_1",
        job_id=holder.job_id,
        guard=lambda session: store.check_holder(session, holder),
    )


def expire(store: JobStore, job_id: str) -> None:
    with store.db.session() as session:
        session.execute(
            update(JobRow).where(JobRow.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_a_job_requeued_after_publishing_does_not_publish_again_and_is_charged_once(parts):
    store, heads = parts
    job = store.create(TENANT, TrainRequest(dataset_id="ds_1", head_name="h"))
    first = store.claim_next("w1", LEASE_S)
    assert first is not None
    published = publish(store, heads, first.holder)
    charged = store.quotas  # the bytes one version costs
    with store.db.session() as session:
        one_version_bytes = charged.stored_bytes(session, TENANT)

    expire(store, job.id)  # the replica died before it could finish the job
    store.requeue_expired(max_attempts=3)
    second = store.claim_next("w2", LEASE_S)
    assert second is not None and second.holder.attempt == 2
    again = publish(store, heads, second.holder)

    assert again.version == published.version and again.weights_sha256 == published.weights_sha256
    assert heads.version_of_job(TENANT, job.id) is not None
    with store.db.session() as session:
        assert session.scalar(select(func.count()).select_from(HeadVersionRow)) == 1
        assert charged.stored_bytes(session, TENANT) == one_version_bytes
    assert heads.resolve(TENANT, "h").version == published.version  # latest did not move
    assert len(list((heads.blobs.root / "named" / "heads").iterdir())) == 1  # the second run's weights are gone


def test_a_run_whose_lease_expired_cannot_publish_even_before_it_is_requeued(parts):
    store, heads = parts
    job = store.create(TENANT, TrainRequest(dataset_id="ds_1", head_name="h"))
    claimed = store.claim_next("w1", LEASE_S)
    assert claimed is not None
    expire(store, job.id)  # nobody has requeued it yet: another replica may do so at any moment
    with pytest.raises(LeaseLost, match="lost its lease"):
        publish(store, heads, claimed.holder)
    with store.db.session() as session:
        assert session.scalar(select(func.count()).select_from(HeadVersionRow)) == 0
