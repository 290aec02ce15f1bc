"""Training jobs: queued, run in a bounded thread pool, followed, cancelled, recovered.

A job is a row in the registry database, so any replica can get, list and
cancel any job. The process that accepted a job runs it in a worker thread
(torch work must never block the event loop), keeps its progress in memory for
watchers, and writes progress to the row at most every ``PERSIST_EVERY_S``.

State changes are conditional UPDATEs (``... WHERE state = 'queued'``), so a
cancel arriving through another replica and the worker starting the job cannot
both win. Each process stamps a heartbeat on the rows of its unfinished jobs;
a job whose heartbeat went stale belonged to a process that died, and any
replica fails it (when it starts, and with each of its own heartbeats) with a
message that says to submit it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field, computed_field
from sqlalchemy import and_, or_, select, update

from adapters.trainer import ProgressEvent
from service.errors import Cancelled, FailedPrecondition, GraftError, NotFound
from service.store.db import Database, JobRow, utcnow
from service.store.heads import check_name
from service.store.pages import check_page_size, decode_token, encode_token, malformed_token
from service.training import Trainer, TrainRequest

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # how often a process stamps its unfinished jobs as alive
STALE_AFTER_S = 60.0  # a heartbeat older than this means the owning process is gone
PERSIST_EVERY_S = 0.5  # progress reaches the row at most this often (phase changes and the end always do)
POLL_S = 1.0  # how often watch() re-reads a job that another replica runs
STOP_GRACE_S = 5.0  # how long stop() waits for running jobs to notice they were cancelled
RESTARTED = "the service restarted while this job was running; submit it again"



class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


_UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)


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


@dataclass
class _LiveJob:
    """A job this process owns, from submit until it ends; ``changed`` fires on every new ``info``."""

    info: JobInfo
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    persisted_at: float = 0.0  # time.monotonic() of the last progress write


class JobRunner:
    def __init__(
        self,
        db: Database,
        trainer: Trainer,
        max_concurrent: int = 1,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        on_finished: Callable[[JobInfo], None] | None = None,
    ) -> None:
        """``on_finished(job)`` is called on the event loop for each job this process ended (metrics)."""
        self.db = db
        self.trainer = trainer
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.on_finished = on_finished
        self._heartbeat_s = heartbeat_s
        self._stale_after = timedelta(seconds=stale_after_s)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="train")
        self._live: dict[str, _LiveJob] = {}
        self._futures: set[asyncio.Future[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Fail the jobs that dead processes left unfinished, then keep this process's jobs marked alive."""
        await self._fail_orphans()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat_forever(), name="job-heartbeat")

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Ask running jobs to stop and wait briefly; they and queued jobs end failed, to be submitted again."""
        self._stopping = True
        for live in self._live.values():
            live.cancel.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._futures:
            await asyncio.wait(list(self._futures), timeout=grace_s)
        self._pool.shutdown(wait=False)

    # -- the API -------------------------------------------------------------------

    async def submit(self, tenant: str, request: TrainRequest) -> JobInfo:
        """Check the request, store it as a queued job and schedule it; returns at once."""
        if self._stopping:
            raise FailedPrecondition("the service is shutting down; submit the job again in a moment")
        info = await asyncio.to_thread(self._create, tenant, request)
        loop = asyncio.get_running_loop()
        live = _LiveJob(info, loop)
        self._live[info.id] = live
        future = loop.run_in_executor(self._pool, self._run, live)
        self._futures.add(future)
        future.add_done_callback(lambda f: self._ended(live, f))
        return info

    def get(self, tenant: str, id: str) -> JobInfo:
        """The row decides the state; for a job running here, memory has the fresher progress."""
        with self.db.session() as session:
            row = session.get(JobRow, id)
            if row is None or row.tenant != tenant:
                raise NotFound(f"job '{id}' not found; list your jobs to see valid ids", job=id)
            return self._freshest(_info(row))

    def list(self, tenant: str, page_size: int = 50, page_token: str | None = None) -> tuple[list[JobInfo], str | None]:
        """Newest first; the token is the (created_at, id) of the last job returned."""
        check_page_size(page_size)
        query = select(JobRow).where(JobRow.tenant == tenant)
        if page_token:
            created_at, last_id = decode_token(page_token, 2)
            try:
                before = datetime.fromisoformat(created_at)
            except ValueError:
                raise malformed_token(page_token) from None
            query = query.where(
                or_(JobRow.created_at < before, and_(JobRow.created_at == before, JobRow.id < last_id))
            )
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(page_size + 1)
        with self.db.session() as session:
            rows = list(session.scalars(query))
            page = [self._freshest(_info(row)) for row in rows[:page_size]]
        next_token = encode_token(page[-1].created_at.isoformat(), page[-1].id) if len(rows) > page_size else None
        return page, next_token

    async def cancel(self, tenant: str, id: str) -> JobInfo:
        """A queued job ends cancelled at once; a running one at the trainer's next check, in whichever replica."""
        job = self.get(tenant, id)
        if job.done:
            raise FailedPrecondition(f"job is already {job.state.value}", job=id)
        live = self._live.get(id)
        if live is not None:
            live.cancel.set()
        row = await asyncio.to_thread(self._request_cancel, id)
        if live is not None and row.state is JobState.CANCELLED:
            self._publish(live, row)
        return self._freshest(row)

    async def watch(self, tenant: str, id: str) -> AsyncIterator[JobInfo]:
        """The job now, then every change until it ends. A slow reader skips to the latest state."""
        job = self.get(tenant, id)  # NotFound on the first step, before anything is yielded
        live = self._live.get(id)
        if live is None:
            async for job in self._poll(tenant, job):
                yield job
            return
        last: JobInfo | None = None
        while True:
            changed, job = live.changed, live.info
            if job != last:
                yield job
                last = job
            if job.done:
                return
            await changed.wait()

    # -- in the worker thread ------------------------------------------------------

    def _run(self, live: _LiveJob) -> None:
        if self._stopping:
            self._finish(live, state=JobState.FAILED, message=RESTARTED, error=RESTARTED)
            return
        if not self._start(live):
            return
        job = live.info
        outcome: dict[str, Any]
        try:
            version = self.trainer.train(
                job.tenant,
                job.request,
                job_id=job.id,
                progress=lambda event: self._progress(live, event),
                cancelled=live.cancel.is_set,
            )
        except Cancelled:
            if self._stopping:
                outcome = {"state": JobState.FAILED, "message": RESTARTED, "error": RESTARTED}
            else:
                outcome = {"state": JobState.CANCELLED, "message": "cancelled"}
        except GraftError as exc:
            outcome = {"state": JobState.FAILED, "message": "failed", "error": exc.message}
        except Exception as exc:
            log.exception("job %s failed", job.id)
            error = f"internal error: {type(exc).__name__}: {exc}"
            outcome = {"state": JobState.FAILED, "message": "failed", "error": error}
        else:
            outcome = {
                "state": JobState.SUCCEEDED,
                "progress": 1.0,
                "message": f"stored head {version.name}@{version.version}",
                "head_version": version.version,
                "metrics": {k: v for k, v in version.metrics.items() if _is_number(v)},
            }
        self._finish(live, **outcome)

    def _start(self, live: _LiveJob) -> bool:
        """queued -> running, unless the job was cancelled meanwhile (here or through another replica)."""
        now = utcnow()
        with self.db.session() as session:
            started = session.execute(
                update(JobRow)
                .where(JobRow.id == live.info.id, JobRow.state == JobState.QUEUED.value)
                .values(state=JobState.RUNNING.value, phase="starting", message="starting",
                        started_at=now, heartbeat_at=now, worker=self.worker)
            ).rowcount == 1
            current = (
                live.info.model_copy(update={"state": JobState.RUNNING, "phase": "starting",
                                             "message": "starting", "started_at": now})
                if started else _info(session.get_one(JobRow, live.info.id))
            )
        self._publish(live, current)
        return started

    def _progress(self, live: _LiveJob, event: ProgressEvent) -> None:
        before = live.info
        job = before.model_copy(update={
            "phase": event.phase,
            "progress": max(before.progress, event.fraction),
            "message": event.message,
            "metrics": {**before.metrics, **event.metrics},
        })
        now = time.monotonic()
        if job.phase != before.phase or now - live.persisted_at >= PERSIST_EVERY_S:
            with self.db.session() as session:
                session.execute(
                    update(JobRow)
                    .where(JobRow.id == job.id, JobRow.state == JobState.RUNNING.value)
                    .values(phase=job.phase, progress=job.progress, message=job.message, metrics=job.metrics)
                )
            live.persisted_at = now
        self._publish(live, job)

    def _finish(self, live: _LiveJob, **outcome: Any) -> None:
        """Write the final state, unless the job already has one (a final state is never overwritten)."""
        job = live.info.model_copy(update={**outcome, "finished_at": utcnow()})
        with self.db.session() as session:
            written = session.execute(
                update(JobRow)
                .where(JobRow.id == job.id, JobRow.state.in_(_UNFINISHED))
                .values(state=job.state.value, phase=job.phase, progress=job.progress, message=job.message,
                        metrics=job.metrics, head_version=job.head_version, error=job.error,
                        finished_at=job.finished_at)
            ).rowcount == 1
            if not written:
                job = _info(session.get_one(JobRow, job.id))
        self._publish(live, job)

    # -- shared by both sides --------------------------------------------------------

    def _publish(self, live: _LiveJob, job: JobInfo) -> None:
        """Make ``job`` the live state and wake the watchers on the event loop (safe from any thread)."""
        live.info = job
        try:
            live.loop.call_soon_threadsafe(_wake, live)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to watch

    def _freshest(self, job: JobInfo) -> JobInfo:
        live = self._live.get(job.id)
        return live.info if live is not None and live.info.state is job.state else job

    # -- on the event loop -----------------------------------------------------------

    def _ended(self, live: _LiveJob, future: asyncio.Future[None]) -> None:
        self._futures.discard(future)
        self._live.pop(live.info.id, None)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.error("job %s could not be recorded", live.info.id, exc_info=exc)
        if live.info.done and self.on_finished is not None:
            self.on_finished(live.info)

    async def _poll(self, tenant: str, job: JobInfo) -> AsyncIterator[JobInfo]:
        """watch() for a job another replica runs: re-read the row every POLL_S."""
        yield job
        while not job.done:
            await asyncio.sleep(POLL_S)
            latest = await asyncio.to_thread(self.get, tenant, job.id)
            if latest != job:
                job = latest
                yield job

    async def _beat_forever(self) -> None:
        """Also sweeps for orphans, so jobs of a replica that died after this one started end too."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await asyncio.to_thread(self._beat, dict(self._live))
                await self._fail_orphans()
            except Exception:
                log.exception("job heartbeat failed; trying again in %.0f s", self._heartbeat_s)

    async def _fail_orphans(self) -> None:
        orphans = await asyncio.to_thread(self._mark_orphans_failed)
        if orphans:
            log.warning("failed %d job(s) left unfinished by a stopped process: %s", len(orphans), ", ".join(orphans))

    # -- database steps (run in threads) ----------------------------------------------

    def _create(self, tenant: str, request: TrainRequest) -> JobInfo:
        """Refuse now what would only fail later in the worker, then store the queued job."""
        check_name("head name", request.head_name)
        self.trainer.split_point(request)  # the backbone is loaded and finetune_blocks is in range
        self.trainer.datasets.get(tenant, request.dataset_id)  # NotFound, for another tenant's too
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
            worker=self.worker,
            heartbeat_at=now,
            created_at=now,
            started_at=None,
            finished_at=None,
        )
        with self.db.session() as session:
            session.add(row)
        return _info(row)

    def _request_cancel(self, id: str) -> JobInfo:
        """Flag the job for its owner's next heartbeat, and end it at once if it has not started."""
        with self.db.session() as session:
            session.execute(update(JobRow).where(JobRow.id == id).values(cancel_requested=True))
            session.execute(
                update(JobRow)
                .where(JobRow.id == id, JobRow.state == JobState.QUEUED.value)
                .values(state=JobState.CANCELLED.value, message="cancelled before it started", finished_at=utcnow())
            )
            return _info(session.get_one(JobRow, id))

    def _beat(self, live: dict[str, _LiveJob]) -> None:
        """Stamp this process's jobs as alive, and pick up cancels that arrived through other replicas."""
        if not live:
            return
        with self.db.session() as session:
            session.execute(
                update(JobRow)
                .where(JobRow.id.in_(live), JobRow.state.in_(_UNFINISHED))
                .values(heartbeat_at=utcnow())
            )
            for id in session.scalars(select(JobRow.id).where(JobRow.id.in_(live), JobRow.cancel_requested)):
                live[id].cancel.set()

    def _mark_orphans_failed(self) -> list[str]:
        now = utcnow()
        with self.db.session() as session:
            unfinished = session.execute(
                select(JobRow.id, JobRow.worker, JobRow.heartbeat_at).where(JobRow.state.in_(_UNFINISHED))
            ).all()
            orphans = [
                id for id, worker, beat in unfinished if id not in self._live and self._orphaned(worker, beat, now)
            ]
            if orphans:
                session.execute(
                    update(JobRow)
                    .where(JobRow.id.in_(orphans), JobRow.state.in_(_UNFINISHED))
                    .values(state=JobState.FAILED.value, message=RESTARTED, error=RESTARTED, finished_at=now)
                )
        return orphans

    def _orphaned(self, worker: str, heartbeat_at: datetime, now: datetime) -> bool:
        """A stale heartbeat, or a process on this host that is gone."""
        if now - heartbeat_at > self._stale_after:
            return True
        host, _, pid = worker.rpartition(":")
        return host == self.worker.rpartition(":")[0] and pid.isdigit() and not _pid_alive(int(pid))


def _wake(live: _LiveJob) -> None:
    changed, live.changed = live.changed, asyncio.Event()
    changed.set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
