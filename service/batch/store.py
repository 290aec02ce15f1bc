"""Storage of batch predictions: job rows, leases, checkpoints and result rows.

Batch predictions are claimed and held like training jobs (``service/jobs/store.py``): every state change
is a conditional UPDATE stating what the writer believes, so a cancel and a claim, or two replicas after a
lease expired, cannot both win. A chunk's results and the checkpoint (``done``) move in one transaction
that first checks the holder still holds an unexpired lease: a replica that lost its job writes nothing,
and the one that resumes it starts at the checkpoint, so every example is answered exactly once.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field, computed_field
from sqlalchemy import ColumnElement, and_, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from service.errors import FailedPrecondition, NotFound
from service.jobs.store import JobState, LeaseLost
from service.quotas import Quotas
from service.store.db import BatchPredictionRow, BatchResultRow, Database, rows_changed, utcnow
from service.store.pages import check_page_size, decode_time, decode_token, encode_token
from service.webhooks import outbox

CLAIM_RACES = 5  # how often claim_next tries again when another replica took the job it picked
RESULT_PAGE = 500  # result rows read per query while a download streams
MAX_TOP_K = 20


class BatchOptions(BaseModel):
    """What every head answers per image (a subset of the predict options: no embeddings, no shadows)."""

    # Bounded below predict's 1,000: every label of every head of every image is stored until the job is deleted.
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="how many labels each head answers, best first")
    min_score: float = Field(
        0.0, ge=0.0, le=1.0, description="a head whose top score is below this answers `abstained: true`"
    )


class BatchInfo(BaseModel):
    id: str
    tenant: str
    state: JobState
    heads: list[str]
    versions: list[str] = Field(description="each head reference as the version it resolved to at creation")
    dataset_id: str
    options: BatchOptions
    total: int
    done_images: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def done(self) -> bool:
        return self.state.done


@dataclass(frozen=True)
class BatchHolder:
    """One run of a batch prediction by one replica: only it may write results or the outcome."""

    batch_id: str
    worker: str
    attempt: int


@dataclass(frozen=True)
class BatchClaim:
    holder: BatchHolder
    batch: BatchInfo


class BatchStore:
    def __init__(self, db: Database, quotas: Quotas) -> None:
        self.db = db
        self.quotas = quotas

    # -- reads -----------------------------------------------------------------------

    def get(self, tenant: str, id: str) -> BatchInfo:
        with self.db.session() as session:
            row = session.get(BatchPredictionRow, id)
            if row is None or row.tenant != tenant:
                raise NotFound(
                    f"batch prediction '{id}' not found; list your batch predictions to see valid ids",
                    batch_prediction=id,
                )
            return _info(row)

    def list(self, tenant: str, page_size: int, page_token: str | None) -> tuple[list[BatchInfo], str | None]:
        """Newest first; the token is the (created_at, id) of the last one returned."""
        check_page_size(page_size)
        table = BatchPredictionRow
        query = select(table).where(table.tenant == tenant)
        if page_token:
            created_at, last_id = decode_token(page_token, 2)
            before = decode_time(page_token, created_at)
            query = query.where(or_(table.created_at < before, and_(table.created_at == before, table.id < last_id)))
        query = query.order_by(table.created_at.desc(), table.id.desc()).limit(page_size + 1)
        with self.db.session() as session:
            rows = list(session.scalars(query))
            page = [_info(row) for row in rows[:page_size]]
        next_token = encode_token(page[-1].created_at.isoformat(), page[-1].id) if len(rows) > page_size else None
        return page, next_token

    def results(self, tenant: str, id: str) -> Iterator[dict[str, Any]]:
        """The result rows in example order, read a page at a time (NotFound now, before the first row)."""
        batch = self.get(tenant, id)
        if batch.state is not JobState.SUCCEEDED:
            raise FailedPrecondition(
                f"batch prediction '{id}' is {batch.state.value}: results are complete only once it succeeded; "
                "get it to follow its progress",
                batch_prediction=id,
            )
        return self._rows(id)

    def _rows(self, id: str) -> Iterator[dict[str, Any]]:
        after = -1
        while True:
            with self.db.session() as session:
                page = list(
                    session.execute(
                        select(BatchResultRow.position, BatchResultRow.row)
                        .where(BatchResultRow.batch_id == id, BatchResultRow.position > after)
                        .order_by(BatchResultRow.position)
                        .limit(RESULT_PAGE)
                    )
                )
            for position, row in page:
                yield row
                after = position
            if len(page) < RESULT_PAGE:
                return

    # -- what clients change ------------------------------------------------------------

    def create(
        self,
        tenant: str,
        heads: builtins.list[str],
        versions: builtins.list[str],
        dataset_id: str,
        total: int,
        options: BatchOptions,
    ) -> BatchInfo:
        """Store a queued batch prediction, inside the transaction that checks the tenant's quota."""
        row = BatchPredictionRow(
            id=f"bp_{uuid.uuid4().hex}",
            tenant=tenant,
            state=JobState.QUEUED.value,
            heads=heads,
            versions=versions,
            dataset_id=dataset_id,
            options=options.model_dump(mode="json"),
            total=total,
            done=0,
            error=None,
            cancel_requested=False,
            worker=None,
            attempts=0,
            lease_expires_at=None,
            created_at=utcnow(),
            started_at=None,
            finished_at=None,
        )
        with self.db.session() as session:
            self.quotas.check_new_batch_prediction(session, tenant)
            session.add(row)
        return _info(row)

    def request_cancel(self, tenant: str, id: str) -> BatchInfo:
        """Flag it for its runner (which reads the flag at each chunk); a queued one ends cancelled at once."""
        batch = self.get(tenant, id)
        if batch.done:
            raise FailedPrecondition(
                f"batch prediction '{id}' is already {batch.state.value}", batch_prediction=id, state=batch.state.value
            )
        table = BatchPredictionRow
        with self.db.session() as session:
            session.execute(update(table).where(table.id == id).values(cancel_requested=True))
            cancelled = session.execute(
                update(table)
                .where(table.id == id, table.state == JobState.QUEUED.value)
                .values(state=JobState.CANCELLED.value, finished_at=utcnow())
            )
            row = session.get_one(table, id, populate_existing=True)
            if rows_changed(cancelled) == 1:
                self._emit_finished(session, row)
            return _info(row)

    def delete(self, tenant: str, id: str) -> None:
        """Delete a finished batch prediction and its results; a queued or running one must be cancelled first."""
        batch = self.get(tenant, id)
        if not batch.done:
            raise FailedPrecondition(
                f"batch prediction '{id}' is {batch.state.value}; cancel it first, then delete it",
                batch_prediction=id,
            )
        self._drop([id])

    def delete_expired(self, ttl_s: float) -> int:
        """Drop batch predictions that finished more than ``ttl_s`` ago, with their results; returns how many."""
        cutoff = utcnow() - timedelta(seconds=ttl_s)
        with self.db.session() as session:
            ids = list(
                session.scalars(
                    select(BatchPredictionRow.id).where(BatchPredictionRow.finished_at < cutoff).limit(RESULT_PAGE)
                )
            )
        self._drop(ids)
        return len(ids)

    def _drop(self, ids: builtins.list[str]) -> None:
        if not ids:
            return
        with self.db.session() as session:
            session.execute(delete(BatchResultRow).where(BatchResultRow.batch_id.in_(ids)))
            session.execute(delete(BatchPredictionRow).where(BatchPredictionRow.id.in_(ids)))

    # -- scheduling -----------------------------------------------------------------------

    def claim_next(self, worker: str, lease_s: float) -> BatchClaim | None:
        """Take the oldest queued batch prediction of the tenant with the fewest running; None when none waits."""
        table = BatchPredictionRow
        for _ in range(CLAIM_RACES):
            with self.db.session() as session:
                queued = session.execute(
                    select(table.id, table.tenant)
                    .where(table.state == JobState.QUEUED.value)
                    .order_by(table.created_at)
                ).all()
                if not queued:
                    return None
                running = {
                    tenant
                    for (tenant,) in session.execute(
                        select(table.tenant).where(table.state == JobState.RUNNING.value).distinct()
                    )
                }
                batch_id = min(queued, key=lambda row: row[1] in running)[0]  # stable: oldest first within a rank
                now = utcnow()
                won = rows_changed(
                    session.execute(
                        update(table)
                        .where(table.id == batch_id, table.state == JobState.QUEUED.value)
                        .values(
                            state=JobState.RUNNING.value,
                            worker=worker,
                            attempts=table.attempts + 1,
                            started_at=now,
                            lease_expires_at=now + timedelta(seconds=lease_s),
                        )
                    )
                )
                if won == 1:
                    row = session.get_one(table, batch_id, populate_existing=True)
                    return BatchClaim(BatchHolder(row.id, worker, row.attempts), _info(row))
        return None

    def requeue_expired(self, max_attempts: int) -> builtins.list[str]:
        """Requeue running batch predictions whose lease expired (their replica died), keeping their checkpoint,
        or fail them after ``max_attempts`` runs. Returns one line per job changed, for the log."""
        table = BatchPredictionRow
        now = utcnow()
        expired_lease = or_(table.lease_expires_at.is_(None), table.lease_expires_at < now)
        changed = []
        with self.db.session() as session:
            expired = session.execute(
                select(table.id, table.attempts).where(table.state == JobState.RUNNING.value, expired_lease)
            ).all()
            for id, attempts in expired:
                if attempts < max_attempts:
                    values: dict[str, Any] = {"state": JobState.QUEUED.value, "worker": None, "lease_expires_at": None}
                    line = f"requeued at its checkpoint: its replica stopped renewing the lease (run {attempts})"
                else:
                    line = (
                        f"the batch prediction was tried {attempts} times and each time the replica running it "
                        f"stopped before it ended (GRAFT_MAX_JOB_ATTEMPTS={max_attempts}); submit it again"
                    )
                    values = {
                        "state": JobState.FAILED.value,
                        "error": line,
                        "worker": None,
                        "lease_expires_at": None,
                        "finished_at": now,
                    }
                where = and_(
                    table.id == id, table.state == JobState.RUNNING.value, table.attempts == attempts, expired_lease
                )
                if rows_changed(session.execute(update(table).where(where).values(**values))) == 1:
                    changed.append(f"{id}: {line}")
                    if values["state"] == JobState.FAILED.value:
                        self._emit_finished(session, session.get_one(table, id, populate_existing=True))
        return changed

    # -- by the holder of a run --------------------------------------------------------------

    def renew(self, holders: builtins.list[BatchHolder], lease_s: float) -> tuple[set[str], set[str]]:
        """Extend the leases still held; returns (ids whose lease was lost, ids a client asked to cancel)."""
        now = utcnow()
        lost = set()
        with self.db.session() as session:
            for holder in holders:
                renewed = session.execute(
                    update(BatchPredictionRow)
                    .where(_holds(holder))
                    .values(lease_expires_at=now + timedelta(seconds=lease_s))
                )
                if rows_changed(renewed) != 1:
                    lost.add(holder.batch_id)
            ids = [holder.batch_id for holder in holders]
            cancels = set(
                session.scalars(
                    select(BatchPredictionRow.id).where(
                        BatchPredictionRow.id.in_(ids), BatchPredictionRow.cancel_requested
                    )
                )
            )
        return lost, cancels

    def write_chunk(self, holder: BatchHolder, start: int, rows: builtins.list[dict[str, Any]]) -> None:
        """Store the results of examples ``start..start+len(rows)`` and move the checkpoint past them, in one
        transaction, only while ``holder`` holds an unexpired lease and the checkpoint is still ``start``."""
        table = BatchPredictionRow
        with self.db.session() as session:
            held = session.scalar(
                select(table.id)
                .where(_holds(holder), table.done == start, table.lease_expires_at > utcnow())
                .with_for_update()
            )
            if held is None:
                raise LeaseLost(
                    f"batch prediction '{holder.batch_id}' run {holder.attempt} lost its lease to another replica; "
                    "its chunk is not stored",
                    batch_prediction=holder.batch_id,
                )
            if rows:
                session.execute(
                    insert(BatchResultRow),
                    [{"batch_id": holder.batch_id, "position": start + i, "row": row} for i, row in enumerate(rows)],
                )
            session.execute(update(table).where(table.id == holder.batch_id).values(done=start + len(rows)))

    def finish(self, holder: BatchHolder, state: JobState, error: str | None = None) -> bool:
        """Write the final state if ``holder`` still holds the run; False when it no longer does."""
        with self.db.session() as session:
            written = session.execute(
                update(BatchPredictionRow)
                .where(_holds(holder))
                .values(state=state.value, error=error, finished_at=utcnow(), lease_expires_at=None)
            )
            if rows_changed(written) != 1:
                return False
            self._emit_finished(session, session.get_one(BatchPredictionRow, holder.batch_id, populate_existing=True))
            return True

    def _emit_finished(self, session: Session, row: BatchPredictionRow) -> None:
        """``batch_prediction.finished`` for the tenant's webhooks, in the transaction that wrote the final state."""
        data = {
            "dataset": f"datasets/{row.dataset_id}",
            "head_versions": list(row.versions),
            "images_done": row.done,
            "images_total": row.total,
            "error": row.error,
        }
        name = f"batchPredictions/{row.id}"
        kept = self.quotas.settings.webhook_deliveries_kept
        outbox.batch_prediction_finished(session, row.tenant, name, row.state, data, kept=kept)

    def hand_back(self, holder: BatchHolder) -> bool:
        """Requeue a run this replica interrupted (shutdown) at its checkpoint; it does not count as an attempt."""
        with self.db.session() as session:
            values = {
                "state": JobState.QUEUED.value,
                "worker": None,
                "lease_expires_at": None,
                "attempts": BatchPredictionRow.attempts - 1,
            }
            return rows_changed(session.execute(update(BatchPredictionRow).where(_holds(holder)).values(**values))) == 1


def _holds(holder: BatchHolder) -> ColumnElement[bool]:
    return and_(
        BatchPredictionRow.id == holder.batch_id,
        BatchPredictionRow.worker == holder.worker,
        BatchPredictionRow.attempts == holder.attempt,
        BatchPredictionRow.state == JobState.RUNNING.value,
    )


def _info(row: BatchPredictionRow) -> BatchInfo:
    return BatchInfo(
        id=row.id,
        tenant=row.tenant,
        state=JobState(row.state),
        heads=list(row.heads),
        versions=list(row.versions),
        dataset_id=row.dataset_id,
        options=BatchOptions.model_validate(row.options),
        total=row.total,
        done_images=row.done,
        error=row.error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
