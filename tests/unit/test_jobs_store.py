"""JobStore's conditional updates on SQLite and a real PostgreSQL: claims, fairness, leases, holders."""

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from service.config import Settings
from service.jobs.store import Claim, JobState, JobStore, LeaseLost
from service.quotas import Quotas
from service.store.db import Database, JobRow, utcnow
from service.training import TrainRequest

LEASE_S = 60.0


@pytest.fixture
def store(registry_url: str, tmp_path: Path) -> JobStore:
    return JobStore(Database(registry_url), Quotas(Settings(data_dir=tmp_path)))


def submit(store: JobStore, tenant: str, head: str = "h") -> str:
    return store.create(tenant, TrainRequest(dataset_id="ds_1", head_name=head)).id


def claim(store: JobStore, worker: str = "w1") -> Claim:
    claimed = store.claim_next(worker, LEASE_S)
    assert claimed is not None
    return claimed


def expire(store: JobStore, job_id: str) -> None:
    with store.db.session() as session:
        session.execute(
            update(JobRow).where(JobRow.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def succeed(store: JobStore, claimed: Claim) -> None:
    done = claimed.job.model_copy(update={"state": JobState.SUCCEEDED, "finished_at": utcnow()})
    assert store.finish(claimed.holder, done)[0]


def test_racing_replicas_claim_each_job_exactly_once(store):
    submitted = {submit(store, f"tenant-{i % 3}") for i in range(12)}

    def drain(worker: str) -> list[str]:
        claimed = []
        while (next_claim := store.claim_next(worker, LEASE_S)) is not None:
            claimed.append(next_claim.job.id)
        return claimed

    with ThreadPoolExecutor(4) as pool:
        claimed = [job_id for ids in pool.map(drain, ["a", "b", "c", "d"]) for job_id in ids]
    assert sorted(claimed) == sorted(submitted)
    with store.db.session() as session:
        assert {row.attempts for row in session.query(JobRow)} == {1}


def test_claims_go_to_the_tenant_with_fewer_running_jobs_then_to_the_one_served_longest_ago(store):
    busy = [submit(store, "busy", f"b{i}") for i in range(3)]
    quiet = submit(store, "quiet", "q0")

    first = claim(store)
    assert first.job.id == busy[0]  # nobody runs anything: the oldest queued job
    second = claim(store)
    assert second.job.id == quiet  # busy has one running, quiet none
    succeed(store, first)
    third = claim(store)
    assert third.job.id == busy[1]  # busy has none running now, quiet one

    late = submit(store, "late", "l0")
    succeed(store, second)
    succeed(store, third)
    assert claim(store).job.id == late  # nothing runs: never served beats the others, though its job is newest


def test_a_claimed_job_carries_its_run_and_whether_a_cancel_was_asked(store):
    job_id = submit(store, "acme")
    claimed = claim(store, "w1")
    assert (claimed.holder.job_id, claimed.holder.worker, claimed.holder.attempt) == (job_id, "w1", 1)
    assert claimed.job.state is JobState.RUNNING and not claimed.cancel_requested
    assert store.claim_next("w2", LEASE_S) is None


def test_an_expired_lease_is_requeued_until_the_last_attempt_then_failed(store):
    job_id = submit(store, "acme")
    for attempt in (1, 2):
        assert claim(store).holder.attempt == attempt
        expire(store, job_id)
        assert len(store.requeue_expired(max_attempts=3)) == 1
        assert store.get("acme", job_id).state is JobState.QUEUED
    claim(store)
    expire(store, job_id)
    store.requeue_expired(max_attempts=3)

    failed = store.get("acme", job_id)
    assert failed.state is JobState.FAILED and failed.done
    assert "tried 3 times" in failed.error and "GRAFT_MAX_JOB_ATTEMPTS=3" in failed.error


def test_a_live_lease_is_not_requeued(store):
    submit(store, "acme")
    claim(store)
    assert store.requeue_expired(max_attempts=3) == []


def test_after_losing_its_lease_a_run_can_write_nothing_and_publish_nothing(store):
    job_id = submit(store, "acme")
    old = claim(store, "w1")
    expire(store, job_id)
    store.requeue_expired(max_attempts=3)
    new = claim(store, "w2")

    assert not store.write_progress(old.holder, old.job.model_copy(update={"message": "stale"}))
    written, row = store.finish(old.holder, old.job.model_copy(update={"state": JobState.FAILED}))
    assert not written and row.state is JobState.RUNNING
    assert not store.hand_back(old.holder, "stale")
    with store.db.session() as session, pytest.raises(LeaseLost, match="lost its lease"):
        store.check_holder(session, old.holder)
    with store.db.session() as session:
        store.check_holder(session, new.holder)  # the new holder may publish
    assert store.renew([old.holder], LEASE_S)[0] == {job_id}
    assert store.renew([new.holder], LEASE_S)[0] == set()


def test_renewing_reports_cancels_asked_through_any_replica(store):
    job_id = submit(store, "acme")
    claimed = claim(store)
    assert store.request_cancel(job_id).state is JobState.RUNNING  # a running job ends at its runner's next check
    lost, cancels = store.renew([claimed.holder], LEASE_S)
    assert (lost, cancels) == (set(), {job_id})


def test_handing_back_an_interrupted_run_requeues_it_without_counting_the_attempt(store):
    job_id = submit(store, "acme")
    claimed = claim(store)
    assert store.hand_back(claimed.holder, "requeued: shutting down")
    with store.db.session() as session:
        row = session.get_one(JobRow, job_id)
        assert (row.state, row.attempts, row.worker, row.lease_expires_at) == ("queued", 0, None, None)


def test_a_queued_job_is_cancelled_at_once_and_never_claimed(store):
    job_id = submit(store, "acme")
    assert store.request_cancel(job_id).state is JobState.CANCELLED
    assert store.claim_next("w1", LEASE_S) is None
