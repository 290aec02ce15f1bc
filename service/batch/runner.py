"""Scheduling of batch predictions: creating, claiming, running chunk by chunk, lease renewal, cancel.

A batch prediction is scheduled as a training job is (``service/jobs/runner.py``): any
replica that runs background work (every role but ``serve``) claims queued ones from the
registry when it has a free slot (``GRAFT_MAX_CONCURRENT_BATCH_PREDICTIONS``), holds each
under a lease its heartbeat thread renews (``GRAFT_JOB_LEASE_S``), and any replica
requeues one whose lease expired, up to ``GRAFT_MAX_JOB_ATTEMPTS`` runs. A run answers
``GRAFT_BATCH_CHUNK_IMAGES`` examples at a time and stores each chunk's rows with the
checkpoint (``BatchStore.write_chunk``), so a run on another replica resumes where the
last chunk ended and every example is answered once. A cancel, a lost lease or a
shutdown stops a run at its next part; on shutdown the job goes back to the queue.

The heads are the versions the references resolved to at creation, loaded through the
serving head cache.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import select

from service.batch.execution import BatchExample, ChunkPredictor
from service.batch.store import BatchClaim, BatchHolder, BatchInfo, BatchOptions, BatchStore
from service.config import Settings
from service.engine.backbones import Backbone
from service.engine.head_cache import IMAGENET_TENANT, HeadCache, LoadedHead
from service.errors import (
    Cancelled,
    FailedPrecondition,
    GraftError,
    InvalidArgument,
    NotFound,
    Unavailable,
    log_internal_error,
)
from service.jobs.store import JobState, LeaseLost
from service.prediction_options import PredictOptions
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.datasets import DatasetStore
from service.store.db import Database, DatasetRow, ExampleRow

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a replica looks for queued batch predictions and expired leases


@dataclass
class _LiveBatch:
    """A run this replica holds, from claim until it ends."""

    holder: BatchHolder
    batch: BatchInfo
    stop: threading.Event = field(default_factory=threading.Event)  # the run stops at its next part
    cancel_requested: bool = False  # a client asked (not shutdown, not a lost lease)
    lease_lost: bool = False


class BatchRunner:
    def __init__(
        self,
        db: Database,
        datasets: DatasetStore,
        heads: HeadCache,
        backbones: dict[str, Backbone],
        blobs: BlobStore,
        settings: Settings,
        quotas: Quotas,
        serving: Callable[[], int],
        *,
        on_finished: Callable[[BatchInfo], None] | None = None,
    ) -> None:
        """``on_finished(batch)`` is called from the run's thread for each batch prediction this replica ended."""
        self.store = BatchStore(db, quotas)
        self.db = db
        self.datasets = datasets
        self.heads = heads
        self.settings = settings
        self.on_finished = on_finished
        self.chunks = ChunkPredictor(backbones, blobs, settings, serving)
        # Unique per runner, so two runners in one process (tests, benchmarks) are two replicas.
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = ThreadPoolExecutor(settings.max_concurrent_batch_predictions, thread_name_prefix="batch-job")
        # Each run's chunk writes, one at a time per run, beside its next chunk's trunk work.
        self._writers = ThreadPoolExecutor(settings.max_concurrent_batch_predictions, thread_name_prefix="batch-write")
        self._live: dict[str, _LiveBatch] = {}
        self._runs: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()  # guards _live and _runs
        self._look_now = threading.Event()
        self._stop_claiming = threading.Event()
        self._stop_renewing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for target, name in ((self._schedule_forever, "batch-scheduler"), (self._renew_forever, "batch-heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    async def stop(self) -> None:
        """Stop running batch predictions at their next part and hand them back to the queue at their checkpoint."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_claiming.set()
        self._look_now.set()
        with self._lock:
            live, runs = list(self._live.values()), set(self._runs)
        for batch in live:
            batch.stop.set()
        if runs:
            await asyncio.to_thread(concurrent.futures.wait, runs, self.settings.shutdown_grace_s)
        with self._lock:
            stuck = list(self._live.values())
        for batch in stuck:
            batch.lease_lost = True  # whatever it does later, it writes nothing
            await asyncio.to_thread(self.store.hand_back, batch.holder)
        self._stop_renewing.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._pool.shutdown(wait=False)
        self._writers.shutdown(wait=False)
        self.chunks.shutdown()

    # -- the API ----------------------------------------------------------------------------

    async def create(self, tenant: str, head_refs: list[str], dataset_id: str, options: BatchOptions) -> BatchInfo:
        """Check the heads and the dataset now, pin each reference to its version, and queue the job."""
        if self._stopping:
            raise Unavailable("this replica is shutting down; create the batch prediction again")
        limit = self.settings.max_batch_prediction_heads
        if not 1 <= len(head_refs) <= limit:
            raise InvalidArgument(
                f"{len(head_refs)} heads in one batch prediction; name 1 to {limit} "
                "(GRAFT_MAX_BATCH_PREDICTION_HEADS), e.g. 'my-head', 'my-head@2' or 'my-head:prod'"
            )
        loaded = [await self.heads.get(tenant, ref) for ref in head_refs]  # NotFound for an unknown one
        versions = [_pinned(ref, head) for ref, head in zip(head_refs, loaded, strict=True)]
        dataset = await asyncio.to_thread(self.datasets.get, tenant, dataset_id)  # NotFound for another's
        if dataset.num_examples == 0:
            raise InvalidArgument(f"dataset '{dataset_id}' has no examples; upload images to predict first")
        if dataset.num_examples > self.settings.max_batch_prediction_images:
            raise InvalidArgument(
                f"dataset '{dataset_id}' has {dataset.num_examples:,} examples, over the limit of "
                f"{self.settings.max_batch_prediction_images:,} per batch prediction "
                "(GRAFT_MAX_BATCH_PREDICTION_IMAGES); split it into smaller datasets"
            )
        info = await asyncio.to_thread(
            self.store.create, tenant, list(head_refs), versions, dataset_id, dataset.num_examples, options
        )
        self._look_now.set()
        return info

    def get(self, tenant: str, id: str) -> BatchInfo:
        return self.store.get(tenant, id)

    def list(self, tenant: str, page_size: int, page_token: str | None) -> tuple[list[BatchInfo], str | None]:
        return self.store.list(tenant, page_size, page_token)

    def cancel(self, tenant: str, id: str) -> BatchInfo:
        """A queued one ends cancelled at once; a running one at its next part, on whichever replica runs it."""
        info = self.store.request_cancel(tenant, id)
        live = self._live.get(id)
        if live is not None:
            live.cancel_requested = True
            live.stop.set()
        return info

    def delete(self, tenant: str, id: str) -> None:
        self.store.delete(tenant, id)

    # -- the scheduler and heartbeat threads ---------------------------------------------------

    @property
    def claims_batches(self) -> bool:
        """Whether this replica runs batch predictions: every role but 'serve', as for training jobs."""
        return self.settings.role != "serve"

    def _schedule_forever(self) -> None:
        while not self._stop_claiming.is_set():
            self._look_now.clear()
            try:
                for line in self.store.requeue_expired(self.settings.max_job_attempts):
                    log.warning("batch prediction %s", line)
                self.store.delete_expired(self.settings.batch_results_ttl_s)
                while self.claims_batches and not self._stop_claiming.is_set() and self._free_slots() > 0:
                    claim = self.store.claim_next(self.worker, self.settings.job_lease_s)
                    if claim is None:
                        break
                    self._launch(claim)
            except Exception:
                log.exception("batch prediction scheduling failed; trying again in %.1f s", POLL_S)
            self._look_now.wait(POLL_S)

    def _renew_forever(self) -> None:
        lease_s = self.settings.job_lease_s
        while not self._stop_renewing.wait(lease_s / 3):
            with self._lock:
                live = [batch for batch in self._live.values() if not batch.lease_lost]
            if not live:
                continue
            try:
                lost, cancels = self.store.renew([batch.holder for batch in live], lease_s)
            except Exception:
                log.exception("renewing batch prediction leases failed; trying again in %.1f s", lease_s / 3)
                continue
            for batch in live:
                if batch.holder.batch_id in lost:
                    log.warning("batch prediction %s: lease lost to another replica", batch.holder.batch_id)
                    batch.lease_lost = True
                    batch.stop.set()
                if batch.holder.batch_id in cancels:
                    batch.cancel_requested = True
                    batch.stop.set()

    def _free_slots(self) -> int:
        with self._lock:
            return self.settings.max_concurrent_batch_predictions - len(self._live)

    def _launch(self, claim: BatchClaim) -> None:
        live = _LiveBatch(claim.holder, claim.batch)
        with self._lock:
            self._live[live.holder.batch_id] = live
            run = self._pool.submit(self._run, live)
            self._runs.add(run)
        run.add_done_callback(self._forget)

    def _forget(self, run: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._runs.discard(run)

    # -- in a batch job thread -------------------------------------------------------------------

    def _run(self, live: _LiveBatch) -> None:
        try:
            outcome = self._predict_all(live)
            if outcome is not None and not live.lease_lost:
                self._finish(live, *outcome)
        except Exception:
            log.exception("batch prediction %s could not be recorded", live.holder.batch_id)
        finally:
            with self._lock:
                self._live.pop(live.holder.batch_id, None)
            self._look_now.set()  # a slot is free

    def _predict_all(self, live: _LiveBatch) -> tuple[JobState, str | None] | None:
        """Answer every example from the checkpoint on; the final (state, error), or None to write nothing."""
        batch = live.batch
        options = PredictOptions(top_k=batch.options.top_k, min_score=batch.options.min_score)
        writing: concurrent.futures.Future[None] | None = None  # the last chunk's rows, stored while the next runs
        try:
            heads = [self._load(batch.tenant, ref) for ref in batch.versions]
            done = batch.done_images
            while done < batch.total:
                examples = self._examples(batch, done)
                if not examples:
                    raise FailedPrecondition(
                        f"dataset '{batch.dataset_id}' has {done} examples, fewer than the {batch.total} it had when "
                        "the batch prediction was created; create a new batch prediction",
                        dataset_id=batch.dataset_id,
                    )
                rows = self.chunks.predict(heads, examples, options, live.stop.is_set)
                if live.stop.is_set():
                    raise Cancelled("batch prediction stopped")
                if writing is not None:
                    writing.result()
                writing = self._writers.submit(self.store.write_chunk, live.holder, done, rows)
                done += len(rows)
            if writing is not None:
                writing.result()
        except LeaseLost as exc:
            log.warning("%s", exc.message)
            return None
        except Cancelled:
            if live.lease_lost:
                return None
            if live.cancel_requested or not self._stopping:
                return JobState.CANCELLED, None
            if self.store.hand_back(live.holder):
                log.info("batch prediction %s interrupted by shutdown; back in the queue", batch.id)
            return None
        except GraftError as exc:
            return JobState.FAILED, exc.message
        except Exception as exc:
            message, _ = log_internal_error(log, f"batch prediction {batch.id}", exc)
            return JobState.FAILED, message
        finally:
            if writing is not None:
                concurrent.futures.wait([writing])  # ended before the outcome is written
        return JobState.SUCCEEDED, None

    def _finish(self, live: _LiveBatch, state: JobState, error: str | None) -> None:
        """Where a batch prediction reaches its final state on the replica that ran it (a queued one cancelled
        ends in ``BatchStore.request_cancel``; one out of attempts in ``BatchStore.requeue_expired``)."""
        if not self.store.finish(live.holder, state, error):
            return
        ended = self.store.get(live.batch.tenant, live.batch.id)
        log.info("batch prediction %s %s", ended.id, ended.state.value)
        if self.on_finished is not None:
            self.on_finished(ended)

    def _load(self, tenant: str, ref: str) -> LoadedHead:
        """A pinned head version through the serving head cache (which lives on the event loop)."""
        assert self._loop is not None, "start() was not called"
        return asyncio.run_coroutine_threadsafe(self.heads.get(tenant, ref), self._loop).result()

    def _examples(self, batch: BatchInfo, start: int) -> builtins.list[BatchExample]:
        """The next chunk of the dataset's examples from ``start`` (positions are 0..n-1, in upload order)."""
        with self.db.session() as session:
            dataset = session.get(DatasetRow, batch.dataset_id)
            if dataset is None or dataset.tenant != batch.tenant:
                raise NotFound(
                    f"dataset '{batch.dataset_id}' was deleted while the batch prediction ran; upload it again and "
                    "create a new batch prediction",
                    dataset_id=batch.dataset_id,
                )
            rows = session.execute(
                select(ExampleRow.position, ExampleRow.file_name, ExampleRow.client_id, ExampleRow.image_sha256)
                .where(ExampleRow.dataset_id == batch.dataset_id, ExampleRow.position >= start)
                .order_by(ExampleRow.position)
                .limit(self.settings.batch_chunk_images)
            ).all()
        return [BatchExample(*row) for row in rows]


def _pinned(ref: str, head: LoadedHead) -> str:
    """The version a reference names now: ``name@N``; a backbone's ImageNet head is one version forever."""
    return ref if head.key.tenant == IMAGENET_TENANT else f"{head.name}@{head.version}"
