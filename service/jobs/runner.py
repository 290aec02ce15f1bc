"""Scheduling of training jobs: claiming, running, lease renewal, watching.

Jobs are claimed from the database, not run by the replica that accepted them:
each replica's scheduler thread, whenever it has a free slot (every
``POLL_S``, and at once after a submit here or a run ending here), claims the
next queued job (fair across tenants, see ``JobStore.claim_next``) and runs it
in a training thread (torch work must never block the event loop).

A running job is held under a lease that a dedicated heartbeat thread renews,
never the event loop's default executor, which also decodes images, so a busy
replica is not taken for a dead one. Any replica requeues a job whose lease
expired, up to ``max_job_attempts`` runs. Only the lease holder writes the job's
progress and outcome or publishes its head (the trainer's guard), so a run that
lost its lease can finish but never stores anything.

A replica with ``GRAFT_ROLE=serve`` never claims a job: its scheduler only
requeues expired leases (a cheap update any replica may make, and one that
lets a job whose training replica died go back to the queue, or fail after
its last attempt, even while no training replica is up). Creating, listing,
watching and cancelling jobs work on every replica: they go through the
database, and a cancel reaches the replica running the job through its
lease renewal.

On ``stop()`` running jobs are interrupted and handed back to the queue, and
queued jobs stay queued: the next replica (or this one, restarted) runs them.
Watches still open then go on until the doors stop; ``close()`` ends their
threads after that.

The runner of a job keeps its progress in memory for watchers here, and writes
it to the row at most every ``PERSIST_EVERY_S`` for watchers elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from adapters.metrics import finite
from adapters.trainer import ProgressEvent
from service.config import Settings
from service.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    GraftError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    log_internal_error,
)
from service.jobs.store import Claim, Holder, JobInfo, JobState, JobStore, LeaseLost
from service.quotas import Quotas
from service.store.db import Database, utcnow
from service.store.heads import check_name
from service.training import FEATURE_BYTES, FEATURE_COPIES, Trainer, TrainRequest

log = logging.getLogger(__name__)

WATCH_THREADS = 2  # database reads of all job watches in a worker, at once
POLL_S = 0.5  # how often a replica looks for queued jobs and expired leases, and watch() re-reads a row
PERSIST_EVERY_S = 0.5  # progress reaches the row at most this often (phase changes and the end always do)
HANDED_BACK = "requeued: the replica running it shut down; another replica will run it again"


@dataclass
class _LiveJob:
    """A run this replica holds, from claim until it ends; ``changed`` fires on every new ``info``."""

    holder: Holder
    info: JobInfo
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() past which the run fails (GRAFT_MAX_JOB_SECONDS)
    cancel: threading.Event = field(default_factory=threading.Event)  # the trainer stops at its next check
    cancel_requested: bool = False  # a client asked (not shutdown, not a lost lease)
    lease_lost: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    persisted_at: float = 0.0  # time.monotonic() of the last progress write


class JobRunner:
    def __init__(
        self,
        db: Database,
        trainer: Trainer,
        settings: Settings,
        quotas: Quotas,
        *,
        on_finished: Callable[[JobInfo], None] | None = None,
    ) -> None:
        """``on_finished(job)`` is called on the event loop for each job this replica ended (metrics)."""
        self.store = JobStore(db, quotas)
        self.trainer = trainer
        self.settings = settings
        # Unique per runner, so two runners in one process (tests, benchmarks) are two replicas.
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_finished = on_finished
        self._pool = ThreadPoolExecutor(max_workers=settings.max_concurrent_jobs, thread_name_prefix="train")
        self._watch_pool = ThreadPoolExecutor(max_workers=WATCH_THREADS, thread_name_prefix="watch")
        self._live: dict[str, _LiveJob] = {}
        self._runs: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()  # guards _live and _runs, shared by the loop and the job threads
        self._look_now = threading.Event()  # wakes the scheduler: a job was submitted or a slot freed
        self._stop_claiming = threading.Event()
        self._stop_renewing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._claimed = asyncio.Event()  # fires when this replica claims a job: watchers switch to memory
        self._watches: Counter[str] = Counter()  # open watches per tenant on this replica (event loop only)
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start claiming jobs (unless this replica only serves) and requeueing expired ones, and renewing the
        leases of those run here."""
        self._loop = asyncio.get_running_loop()
        for target, name in ((self._schedule_forever, "job-scheduler"), (self._renew_forever, "job-heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    async def stop(self) -> None:
        """Interrupt running jobs and hand them back to the queue; queued jobs stay queued.

        Waits at most ``shutdown_grace_s`` for the runs to notice; a run still
        going then is handed back from here and can no longer write or publish.
        """
        self._stopping = True
        self._stop_claiming.set()
        self._look_now.set()
        with self._lock:
            live, runs = list(self._live.values()), set(self._runs)
        for job in live:
            job.cancel.set()
        if runs:
            await asyncio.to_thread(concurrent.futures.wait, runs, self.settings.shutdown_grace_s)
        with self._lock:
            stuck = list(self._live.values())
        for job in stuck:
            job.lease_lost = True  # the run may end later: it must not write over the requeued row
            await asyncio.to_thread(self.store.hand_back, job.holder, HANDED_BACK)
            log.warning(
                "job %s did not stop within %.0f s; handed back to the queue",
                job.holder.job_id,
                self.settings.shutdown_grace_s,
            )
        self._stop_renewing.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._pool.shutdown(wait=False)

    def close(self) -> None:
        """End the watches' threads: call after ``stop``, once the doors stopped and no watch reads any more."""
        self._watch_pool.shutdown(wait=False, cancel_futures=True)

    # -- the API ---------------------------------------------------------------------------

    async def submit(self, tenant: str, request: TrainRequest) -> JobInfo:
        """Check the request and its cost, store it as a queued job and wake the scheduler; returns at once."""
        if self._stopping:
            raise Unavailable("this replica is shutting down; submit the job again and another replica takes it")
        info = await asyncio.to_thread(self._create, tenant, request)
        self._look_now.set()
        return info

    def get(self, tenant: str, id: str) -> JobInfo:
        """The row decides the state; for a job running here, memory has the fresher progress (sync: HTTP door)."""
        return self._freshest(self.store.get(tenant, id))

    def list(self, tenant: str, page_size: int = 50, page_token: str | None = None) -> tuple[list[JobInfo], str | None]:
        jobs, token = self.store.list(tenant, page_size, page_token)
        return [self._freshest(job) for job in jobs], token

    async def cancel(self, tenant: str, id: str) -> JobInfo:
        """A queued job ends cancelled at once; a running one at the trainer's next check, in whichever replica."""
        job = await asyncio.to_thread(self.get, tenant, id)
        if job.done:
            raise FailedPrecondition(f"job is already {job.state.value}", job=id)
        live = self._live.get(id)
        if live is not None:
            live.cancel_requested = True
            live.cancel.set()
        return self._freshest(await asyncio.to_thread(self.store.request_cancel, id))

    async def watch(self, tenant: str, id: str) -> AsyncGenerator[JobInfo, None]:
        """The job now, then every change until it ends. A slow reader skips to the latest state.

        A job run here is followed in memory; any other is re-read every ``POLL_S``,
        or as soon as this replica claims a job (it may be this one). A tenant has at
        most ``max_watches_per_tenant`` watches open here: the first step refuses one
        more (ResourceExhausted) before anything is read. Their reads run in a small
        pool of their own, never the default pool that prediction head lookups use.
        """
        self._admit_watch(tenant)
        try:
            job = await self._read_for_watch(tenant, id)  # NotFound on the first step, before any yield
            last: JobInfo | None = None
            while True:
                if job != last:
                    yield job
                    last = job
                if job.done:
                    return
                live = self._live.get(id)
                if live is not None and not live.lease_lost:
                    changed = live.changed
                    if live.info == job:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(changed.wait(), POLL_S)
                    job = live.info
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._claimed.wait(), POLL_S)
                    job = await self._read_for_watch(tenant, id)
        finally:
            self._watches[tenant] -= 1
            if not self._watches[tenant]:
                del self._watches[tenant]

    def _admit_watch(self, tenant: str) -> None:
        limit = self.settings.max_watches_per_tenant
        if self._watches[tenant] >= limit:
            raise ResourceExhausted(
                f"{self._watches[tenant]} job watches of yours are already open on this replica, the limit "
                f"(GRAFT_MAX_WATCHES_PER_TENANT={limit}); close one, or poll the job instead",
                retry_after_s=5.0,
            )
        self._watches[tenant] += 1

    async def _read_for_watch(self, tenant: str, id: str) -> JobInfo:
        call = functools.partial(contextvars.copy_context().run, self.get, tenant, id)
        return await asyncio.get_running_loop().run_in_executor(self._watch_pool, call)

    # -- submit (in a thread) ------------------------------------------------------------

    def _create(self, tenant: str, request: TrainRequest) -> JobInfo:
        """Refuse now what would only fail later, or cost more than one job may, then store the queued job."""
        check_name("head name", request.head_name)
        # The job records the backbone it trains on, whichever replica's default it would otherwise take.
        request = request.model_copy(update={"backbone": request.backbone or self.trainer.default_backbone})
        self._check_cost(tenant, request)
        return self.store.create(tenant, request)

    def _check_cost(self, tenant: str, request: TrainRequest) -> None:
        """Refuse a run that would take longer or hold more memory than one job may, before any of its work:
        at creation, and again before a replica runs it (its settings may be another replica's; a run that
        dies of memory would be requeued onto the next replica, and kill that one too)."""
        cost = self.trainer.cost(tenant, request)
        if cost.work > self.settings.max_job_work:
            raise InvalidArgument(
                f"this job would train {cost.epochs} epochs x {cost.images:,} images x {cost.trials} trials = "
                f"{cost.work:,}, over the limit of {self.settings.max_job_work:,} per job (GRAFT_MAX_JOB_WORK); "
                "use fewer epochs, fewer search trials or a smaller dataset"
            )
        memory, limit = cost.memory, self.settings.max_job_memory_bytes
        if memory.bytes > limit:
            raise InvalidArgument(
                f"this job would hold {memory.bytes:,} bytes of {memory.backbone} features ({cost.images:,} images "
                f"x {memory.elements:,} values at {memory.split} x {FEATURE_BYTES} bytes x {FEATURE_COPIES} "
                f"copies), over the limit of {limit:,} per job (GRAFT_MAX_JOB_MEMORY_BYTES); fine-tune fewer "
                "blocks (finetune_blocks: a later split point holds smaller maps) or train on fewer images"
            )

    # -- the scheduler and heartbeat threads ----------------------------------------------

    @property
    def claims_jobs(self) -> bool:
        """Whether this replica runs training jobs: every role but 'serve'."""
        return self.settings.role != "serve"

    def _schedule_forever(self) -> None:
        lease_s = self.settings.job_lease_s
        while not self._stop_claiming.is_set():
            self._look_now.clear()
            try:
                for line in self.store.requeue_expired(self.settings.max_job_attempts):
                    log.warning("job %s", line)
                while self.claims_jobs and not self._stop_claiming.is_set() and self._free_slots() > 0:
                    claim = self.store.claim_next(self.worker, lease_s)
                    if claim is None:
                        break
                    self._launch(claim)
            except Exception:
                log.exception("job scheduling failed; trying again in %.1f s", POLL_S)
            self._look_now.wait(POLL_S)

    def _renew_forever(self) -> None:
        """Renew this replica's leases every third of a lease; notice lost leases and remote cancels."""
        lease_s = self.settings.job_lease_s
        while not self._stop_renewing.wait(lease_s / 3):
            with self._lock:
                live = [job for job in self._live.values() if not job.lease_lost]
            if not live:
                continue
            try:
                lost, cancels = self.store.renew([job.holder for job in live], lease_s)
            except Exception:
                log.exception("renewing job leases failed; trying again in %.1f s", lease_s / 3)
                continue
            for job in live:
                if job.holder.job_id in lost:
                    log.warning("job %s: lease lost to another replica; stopping this run", job.holder.job_id)
                    job.lease_lost = True
                    job.cancel.set()
                if job.holder.job_id in cancels:
                    job.cancel_requested = True
                    job.cancel.set()

    def _free_slots(self) -> int:
        with self._lock:
            return self.settings.max_concurrent_jobs - len(self._live)

    def _launch(self, claim: Claim) -> None:
        assert self._loop is not None, "start() was not called"
        live = _LiveJob(claim.holder, claim.job, self._loop, time.monotonic() + self.settings.max_job_seconds)
        if claim.cancel_requested:
            live.cancel_requested = True
            live.cancel.set()
        with self._lock:
            self._live[live.holder.job_id] = live
            run = self._pool.submit(self._run, live)
            self._runs.add(run)
        run.add_done_callback(self._forget)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to watch
            self._loop.call_soon_threadsafe(self._announce_claim)

    def _announce_claim(self) -> None:
        claimed, self._claimed = self._claimed, asyncio.Event()
        claimed.set()

    def _forget(self, run: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._runs.discard(run)

    # -- in a training thread ---------------------------------------------------------------

    def _run(self, live: _LiveJob) -> None:
        ended: JobInfo | None = None
        try:
            outcome = self._train(live)
            if outcome is not None and not live.lease_lost:
                written, ended = self._finish(live, outcome)
                ended = ended if written else None
        except Exception:
            log.exception("job %s could not be recorded", live.holder.job_id)
        finally:
            with self._lock:
                self._live.pop(live.holder.job_id, None)
            self._look_now.set()  # a slot is free
        if ended is not None and self.on_finished is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to count it
                live.loop.call_soon_threadsafe(self.on_finished, ended)

    def _train(self, live: _LiveJob) -> dict[str, Any] | None:
        """Run the trainer; the job's final fields, or None when this replica must write nothing."""
        job = live.info
        try:
            # a run of this job before this one published its version, then stopped before finishing the job
            # (its replica stalled or died): finish with that version, never train and publish a second one
            version = self.trainer.heads.version_of_job(job.tenant, job.id)
            if version is None:
                self._check_cost(job.tenant, job.request)  # this replica's bounds, before any feature is read
                version = self.trainer.train(
                    job.tenant,
                    job.request,
                    job_id=job.id,
                    progress=lambda event: self._progress(live, event),
                    cancelled=lambda: self._should_stop(live),
                    guard=lambda session: self.store.check_holder(session, live.holder),  # only the holder publishes
                )
        except LeaseLost as exc:
            log.warning("%s", exc.message)
            return None
        except Cancelled:
            if live.lease_lost:
                return None
            if live.cancel_requested or not self._stopping:
                return {"state": JobState.CANCELLED, "message": "cancelled"}
            if self.store.hand_back(live.holder, HANDED_BACK):
                log.info("job %s interrupted by shutdown; handed back to the queue", job.id)
            return None
        except GraftError as exc:
            return {"state": JobState.FAILED, "message": "failed", "error": exc.message}
        except Exception as exc:
            message, _ = log_internal_error(log, f"job {job.id}", exc)
            return {"state": JobState.FAILED, "message": "failed", "error": message}
        metrics = {key: value for key, value in version.metrics.items() if _is_number(value)}
        return {
            "state": JobState.SUCCEEDED,
            "progress": 1.0,
            "message": f"stored head {version.name}@{version.version}",
            "head_version": version.version,
            "metrics": finite(metrics),
        }

    def _should_stop(self, live: _LiveJob) -> bool:
        """The trainer's cancel check: True to stop; past the wall-clock limit the run fails instead."""
        if live.cancel.is_set():
            return True
        if time.monotonic() > live.deadline:
            raise DeadlineExceeded(
                f"the job ran longer than {self.settings.max_job_seconds:g} s, the limit of one run "
                "(GRAFT_MAX_JOB_SECONDS); train on fewer images, with fewer epochs or fewer search trials"
            )
        return False

    def _progress(self, live: _LiveJob, event: ProgressEvent) -> None:
        if live.lease_lost:
            return
        before = live.info
        job = before.model_copy(
            update={
                "phase": event.phase,
                "progress": max(before.progress, event.fraction),
                "message": event.message,
                "metrics": finite({**before.metrics, **event.metrics}),
            }
        )
        now = time.monotonic()
        if job.phase != before.phase or now - live.persisted_at >= PERSIST_EVERY_S:
            if not self.store.write_progress(live.holder, job):
                live.lease_lost = True
                live.cancel.set()
                return
            live.persisted_at = now
        self._publish(live, job)

    def _finish(self, live: _LiveJob, outcome: dict[str, Any]) -> tuple[bool, JobInfo]:
        """Write the final state while still holding the run; watchers here see what the row says."""
        job = live.info.model_copy(update={**outcome, "finished_at": utcnow()})
        written, current = self.store.finish(live.holder, job)
        self._publish(live, current)
        return written, current

    # -- shared by both sides -------------------------------------------------------------

    def _publish(self, live: _LiveJob, job: JobInfo) -> None:
        """Make ``job`` the live state and wake the watchers on the event loop (safe from any thread)."""
        live.info = job
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to watch
            live.loop.call_soon_threadsafe(_wake, live)

    def _freshest(self, job: JobInfo) -> JobInfo:
        live = self._live.get(job.id)
        return live.info if live is not None and live.info.state is job.state else job


def _wake(live: _LiveJob) -> None:
    changed, live.changed = live.changed, asyncio.Event()
    changed.set()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
