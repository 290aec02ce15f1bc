"""Storage of training jobs: rows, states, leases, fair claiming and listing.

A job is a row in the registry database, so any replica can get, list, cancel
and run any job. Every state change is a conditional UPDATE whose WHERE clause
states what the writer believes (``state = 'queued'``, or "I still hold this
run": worker, attempt and ``state = 'running'``); a rowcount of 1 means it won.
That is exactly-once on SQLite and PostgreSQL alike, so a cancel arriving
through one replica and a claim by another cannot both win, and a replica that
lost its lease can no longer write anything to the job.
"""

from __future__ import annotations

import builtins
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field, computed_field
from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from service.errors import FailedPrecondition, NotFound
from service.quotas import Quotas
from service.store.db import Database, JobRow, rows_changed, utcnow
from service.store.pages import check_page_size, decode_time, decode_token, encode_token
from service.training import TrainRequest
from service.webhooks import outbox
from service.webhooks.events import EventType

# How often claim_next tries again when another replica took the job it picked.
CLAIM_RACES = 5
NEVER = datetime.min.replace(tzinfo=UTC)


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


JOB_EVENTS = {
    JobState.SUCCEEDED: EventType.JOB_SUCCEEDED,
    JobState.FAILED: EventType.JOB_FAILED,
    JobState.CANCELLED: EventType.JOB_CANCELLED,
}


class JobInfo(BaseModel):
    id: str
    tenant: str
    state: JobState
    phase: str
    progress: float = Field(ge=0.0, le=1.0)
    message: str
    request: TrainRequest
    metrics: dict[str, Any]
    head: str
    head_version: int | None = Field(description="the head version the job stored, once it succeeded")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @computed_field  # type: ignore[prop-decorator]  # sent to clients too: AIP's long-running operations have it
    @property
    def done(self) -> bool:
        return self.state.done


class LeaseLost(FailedPrecondition):
    """This replica no longer holds the job's run: its lease expired and another replica requeued or ended it."""


@dataclass(frozen=True)
class Holder:
    """One run of a job by one replica: only it may write progress, the outcome, or publish the head."""

    job_id: str
    worker: str
    attempt: int


@dataclass(frozen=True)
class Claim:
    holder: Holder
    job: JobInfo
    cancel_requested: bool


class JobStore:
    def __init__(self, db: Database, quotas: Quotas) -> None:
        self.db = db
        self.quotas = quotas

    # -- reads -----------------------------------------------------------------------

    def get(self, tenant: str, id: str) -> JobInfo:
        with self.db.session() as session:
            row = session.get(JobRow, id)
            if row is None or row.tenant != tenant:
                raise NotFound(f"job '{id}' not found; list your jobs to see valid ids", job=id)
            return _info(row)

    def list(self, tenant: str, page_size: int, page_token: str | None) -> tuple[list[JobInfo], str | None]:
        """Newest first; the token is the (created_at, id) of the last job returned."""
        check_page_size(page_size)
        query = select(JobRow).where(JobRow.tenant == tenant)
        if page_token:
            created_at, last_id = decode_token(page_token, 2)
            before = decode_time(page_token, created_at)
            query = query.where(or_(JobRow.created_at < before, and_(JobRow.created_at == before, JobRow.id < last_id)))
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(page_size + 1)
        with self.db.session() as session:
            rows = list(session.scalars(query))
            page = [_info(row) for row in rows[:page_size]]
        next_token = encode_token(page[-1].created_at.isoformat(), page[-1].id) if len(rows) > page_size else None
        return page, next_token

    # -- what clients change --------------------------------------------------------------

    def create(self, tenant: str, request: TrainRequest) -> JobInfo:
        """Store a queued job, inside the transaction that checks the tenant's job quota."""
        now = utcnow()
        row = JobRow(
            id=f"job_{uuid.uuid4().hex}",
            tenant=tenant,
            state=JobState.QUEUED.value,
            phase="queued",
            progress=0.0,
            message="waiting for a training slot",
            request=request.model_dump(mode="json"),
            metrics={},
            head_name=request.head_name,
            head_version=None,
            error=None,
            cancel_requested=False,
            worker=None,
            heartbeat_at=now,
            attempts=0,
            lease_expires_at=None,
            created_at=now,
            started_at=None,
            finished_at=None,
        )
        with self.db.session() as session:
            self.quotas.check_new_job(session, tenant)
            session.add(row)
        return _info(row)

    def request_cancel(self, id: str) -> JobInfo:
        """Flag the job for its runner (which polls the flag), and end it at once if it is still queued."""
        with self.db.session() as session:
            session.execute(update(JobRow).where(JobRow.id == id).values(cancel_requested=True))
            cancelled = session.execute(
                update(JobRow)
                .where(JobRow.id == id, JobRow.state == JobState.QUEUED.value)
                .values(state=JobState.CANCELLED.value, message="cancelled before it started", finished_at=utcnow())
            )
            job = _info(session.get_one(JobRow, id, populate_existing=True))
            if rows_changed(cancelled) == 1:
                self._emit_finished(session, job)
            return job

    # -- scheduling ---------------------------------------------------------------------

    def claim_next(self, worker: str, lease_s: float) -> Claim | None:
        """Take the next queued job for ``worker``, fairly across tenants; None when nothing is queued.

        The tenant with the fewest running jobs goes first, then the one whose
        last job started longest ago (so tenants take turns), then the one with
        the oldest queued job; within a tenant, jobs run oldest first.
        """
        for _ in range(CLAIM_RACES):
            with self.db.session() as session:
                job_id = _next_queued(session)
                if job_id is None:
                    return None
                now = utcnow()
                won = (
                    rows_changed(
                        session.execute(
                            update(JobRow)
                            .where(JobRow.id == job_id, JobRow.state == JobState.QUEUED.value)
                            .values(
                                state=JobState.RUNNING.value,
                                phase="starting",
                                message="starting",
                                progress=0.0,
                                metrics={},
                                worker=worker,
                                attempts=JobRow.attempts + 1,
                                started_at=now,
                                heartbeat_at=now,
                                lease_expires_at=now + timedelta(seconds=lease_s),
                            )
                        )
                    )
                    == 1
                )
                if won:
                    row = session.get_one(JobRow, job_id, populate_existing=True)
                    return Claim(Holder(row.id, worker, row.attempts), _info(row), row.cancel_requested)
        return None

    def requeue_expired(self, max_attempts: int) -> builtins.list[str]:
        """Requeue running jobs whose lease expired (their replica died), or fail them after ``max_attempts`` runs.

        Returns one line per job changed, for the log.
        """
        now = utcnow()
        changed = []
        with self.db.session() as session:
            expired = session.execute(
                select(JobRow.id, JobRow.attempts).where(
                    JobRow.state == JobState.RUNNING.value,
                    or_(JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < now),
                )
            ).all()
            for id, attempts in expired:
                if attempts < max_attempts:
                    values: dict[str, Any] = _queued(
                        f"requeued: its replica stopped renewing the lease (run {attempts} of {max_attempts})"
                    )
                else:
                    error = (
                        f"the job was tried {attempts} times and each time the replica running it stopped before it "
                        f"ended (GRAFT_MAX_JOB_ATTEMPTS={max_attempts}); submit it again"
                    )
                    values = {
                        "state": JobState.FAILED.value,
                        "message": "failed",
                        "error": error,
                        "worker": None,
                        "lease_expires_at": None,
                        "finished_at": now,
                    }
                done = (
                    rows_changed(
                        session.execute(
                            update(JobRow)
                            .where(
                                JobRow.id == id,
                                JobRow.state == JobState.RUNNING.value,
                                JobRow.attempts == attempts,
                                or_(JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < now),
                            )
                            .values(**values)
                        )
                    )
                    == 1
                )
                if done:
                    changed.append(f"{id}: {values.get('error') or values['message']}")
                    if values["state"] == JobState.FAILED.value:
                        self._emit_finished(session, _info(session.get_one(JobRow, id, populate_existing=True)))
        return changed

    # -- by the holder of a run ------------------------------------------------------------

    def renew(self, holders: builtins.list[Holder], lease_s: float) -> tuple[set[str], set[str]]:
        """Extend the leases still held; returns (ids whose lease was lost, ids a client asked to cancel)."""
        now = utcnow()
        lost = set()
        with self.db.session() as session:
            for holder in holders:
                renewed = (
                    rows_changed(
                        session.execute(
                            update(JobRow)
                            .where(_holds(holder))
                            .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s))
                        )
                    )
                    == 1
                )
                if not renewed:
                    lost.add(holder.job_id)
            ids = [holder.job_id for holder in holders]
            cancels = set(session.scalars(select(JobRow.id).where(JobRow.id.in_(ids), JobRow.cancel_requested)))
        return lost, cancels

    def write_progress(self, holder: Holder, job: JobInfo) -> bool:
        """False when ``holder`` no longer holds the run (nothing is written)."""
        with self.db.session() as session:
            return (
                rows_changed(
                    session.execute(
                        update(JobRow)
                        .where(_holds(holder))
                        .values(phase=job.phase, progress=job.progress, message=job.message, metrics=job.metrics)
                    )
                )
                == 1
            )

    def finish(self, holder: Holder, job: JobInfo) -> tuple[bool, JobInfo]:
        """Write ``job``'s final state if ``holder`` still holds the run; returns (written, the row now)."""
        with self.db.session() as session:
            written = (
                rows_changed(
                    session.execute(
                        update(JobRow)
                        .where(_holds(holder))
                        .values(
                            state=job.state.value,
                            phase=job.phase,
                            progress=job.progress,
                            message=job.message,
                            metrics=job.metrics,
                            head_version=job.head_version,
                            error=job.error,
                            finished_at=job.finished_at,
                            lease_expires_at=None,
                        )
                    )
                )
                == 1
            )
            if written and job.state.done:
                self._emit_finished(session, job)
            return written, (job if written else _info(session.get_one(JobRow, job.id, populate_existing=True)))

    def hand_back(self, holder: Holder, message: str) -> bool:
        """Requeue a run this replica interrupted (shutdown); it does not count against the job's attempts."""
        with self.db.session() as session:
            return (
                rows_changed(
                    session.execute(
                        update(JobRow).where(_holds(holder)).values(attempts=JobRow.attempts - 1, **_queued(message))
                    )
                )
                == 1
            )

    def _emit_finished(self, session: Session, job: JobInfo) -> None:
        """``job.succeeded`` / ``job.failed`` / ``job.cancelled`` for the tenant's webhooks, in the transaction
        that wrote the final state."""
        version = f"heads/{job.head}/versions/{job.head_version}" if job.head_version else None
        data = {"job": f"jobs/{job.id}", "state": job.state.value, "head_version": version, "error": job.error}
        kept = self.quotas.settings.webhook_deliveries_kept
        outbox.emit(session, job.tenant, JOB_EVENTS[job.state], data, kept=kept)

    def check_holder(self, session: Session, holder: Holder) -> None:
        """Inside the transaction that publishes the job's head: raise LeaseLost unless ``holder`` still holds it.

        An expired lease is lost too, requeued or not yet: any replica may requeue it at any moment.
        """
        held = session.scalar(
            select(JobRow.id).where(_holds(holder), JobRow.lease_expires_at > utcnow()).with_for_update()
        )
        if held is None:
            raise LeaseLost(
                f"job '{holder.job_id}' run {holder.attempt} lost its lease to another replica; its head is not stored",
                job=holder.job_id,
            )


def _holds(holder: Holder) -> ColumnElement[bool]:
    return and_(
        JobRow.id == holder.job_id,
        JobRow.worker == holder.worker,
        JobRow.attempts == holder.attempt,
        JobRow.state == JobState.RUNNING.value,
    )


def _queued(message: str) -> dict[str, Any]:
    """The columns of a job going back to the queue."""
    return {
        "state": JobState.QUEUED.value,
        "phase": "queued",
        "progress": 0.0,
        "message": message,
        "metrics": {},
        "worker": None,
        "lease_expires_at": None,
        "started_at": None,
    }


def _next_queued(session: Session) -> str | None:
    """The id of the job claim_next should take (see its docstring for the order)."""
    queued = session.execute(
        select(JobRow.tenant, func.min(JobRow.created_at))
        .where(JobRow.state == JobState.QUEUED.value)
        .group_by(JobRow.tenant)
    ).all()
    if not queued:
        return None
    tenants = [tenant for tenant, _ in queued]
    running = dict(
        session.execute(
            select(JobRow.tenant, func.count())
            .where(JobRow.tenant.in_(tenants), JobRow.state == JobState.RUNNING.value)
            .group_by(JobRow.tenant)
        ).all()
    )
    last_start = dict(
        session.execute(
            select(JobRow.tenant, func.max(JobRow.started_at)).where(JobRow.tenant.in_(tenants)).group_by(JobRow.tenant)
        ).all()
    )
    tenant, _ = min(queued, key=lambda row: (running.get(row[0], 0), last_start.get(row[0]) or NEVER, row[1]))
    return session.scalar(
        select(JobRow.id)
        .where(JobRow.tenant == tenant, JobRow.state == JobState.QUEUED.value)
        .order_by(JobRow.created_at, JobRow.id)
        .limit(1)
    )


def _info(row: JobRow) -> JobInfo:
    return JobInfo(
        id=row.id,
        tenant=row.tenant,
        state=JobState(row.state),
        phase=row.phase,
        progress=row.progress,
        message=row.message,
        request=TrainRequest.model_validate(row.request),
        metrics=dict(row.metrics),
        head=row.head_name,
        head_version=row.head_version,
        error=row.error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
