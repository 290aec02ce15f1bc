"""Everything one service worker runs, started and stopped together.

Both doors (HTTP and gRPC) receive this object and call only its parts, so a
behaviour exists once: the core (storage, backbones, trainer), the predictor
(head cache + one batcher per backbone), background training jobs, and
tenants with their API keys, and the webhook delivery worker. It also probes the registry database, so both
doors' readiness says "not ready" while the database cannot be reached or
while the worker drains (:meth:`Runtime.drain`), and it collects orphaned
blobs every ``gc_interval_s``. A replica that only trains (``GRAFT_ROLE=train``)
is never ready: readiness says "send me predictions", and it takes none.

Everything a worker holds lives here, never in a module: several runtimes in one
process (tests, benchmarks) share no thread pool, and a stopped runtime's
threads end.
"""

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from sqlalchemy import text

from service.auth import Tenants
from service.batch import BatchRunner
from service.calls import ExportQueue, InflightBytes, Pools, run_in
from service.config import Settings
from service.core import Core
from service.engine.head_cache import HeadCache
from service.engine.predictor import TRAINING_ONLY, Predictor
from service.jobs import JobRunner
from service.metrics import PrometheusMetrics
from service.monitoring import Monitor
from service.store.observations import Observations
from service.store.requests import IdempotencyKeys
from service.webhooks.store import WebhookStore
from service.webhooks.worker import DeliveryWorker

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

PROBE_INTERVAL_S = 3.0
DRAIN_NOTICE_S = 0.5  # the shortest time a draining replica keeps answering /readyz with 503


@dataclass
class Runtime:
    core: Core
    predictor: Predictor
    jobs: JobRunner
    tenants: Tenants
    registry_reachable: bool = True
    probe_interval_s: float = PROBE_INTERVAL_S
    metrics: PrometheusMetrics | None = None  # None: nothing is reported (tests)
    draining: bool = False  # set on SIGTERM: not ready, new calls refused so clients retry elsewhere
    http_in_flight: int = 0  # HTTP calls admitted and not yet answered (kept by the HTTP gate)
    uploads: InflightBytes = field(init=False, repr=False)  # bytes all dataset uploads hold, both doors
    requests: IdempotencyKeys = field(init=False, repr=False)  # idempotency keys of creating calls, both doors
    pools: Pools = field(init=False, repr=False)  # threads for store calls, key lookups, the probe and uploads
    exports: ExportQueue = field(init=False, repr=False)  # model exports, one at a time
    audit_slots: threading.BoundedSemaphore = field(init=False, repr=False)  # label audits running at once
    monitor: Monitor = field(init=False, repr=False)  # what serving observed, flushed to the registry
    webhooks: WebhookStore = field(init=False, repr=False)  # tenants' webhook endpoints and their deliveries
    deliveries: DeliveryWorker = field(init=False, repr=False)  # sends this replica's share of the deliveries
    batches: BatchRunner = field(init=False, repr=False)  # batch predictions, claimed and run like training jobs
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        settings = self.core.settings
        self.uploads = InflightBytes(settings.max_inflight_upload_bytes)
        # A claimed key whose call never completed (its replica died) is free again after the longest call.
        pending_s = settings.upload_timeout_s + 60.0
        self.requests = IdempotencyKeys(
            self.core.db, settings.idempotency_ttl_s, settings.idempotency_keys_per_tenant, pending_s
        )
        self.pools = Pools(settings)
        self.exports = ExportQueue(settings.max_waiting_exports)
        self.audit_slots = threading.BoundedSemaphore(settings.max_concurrent_audits)
        observations = Observations(self.core.db, settings.prediction_ttl_s, settings.max_prediction_records)
        self.monitor = Monitor(observations, settings, lambda fn: run_in(self.pools.store, fn), self.metrics)
        self.predictor.observer = self.monitor  # the predictor is built first (around): it reports from now on
        self.webhooks = WebhookStore(self.core.db, settings)
        self.deliveries = DeliveryWorker(self.webhooks)
        core = self.core
        self.batches = BatchRunner(
            core.db,
            core.datasets,
            self.predictor.heads,
            core.backbones,
            core.blobs,
            settings,
            core.quotas,
            lambda: self.predictor.in_flight,
        )

    @classmethod
    def open(cls, settings: Settings | None = None) -> "Runtime":
        return cls.around(Core.open(settings), PrometheusMetrics())

    @classmethod
    def around(cls, core: Core, metrics: PrometheusMetrics | None = None) -> "Runtime":
        """The predictor, jobs and tenants that serve ``core``; without ``metrics`` nothing is reported (tests)."""
        heads = HeadCache(
            core.heads, core.backbones, core.settings.head_cache_bytes, monitoring=core.settings.monitoring
        )
        predictor = Predictor(core.backbones, heads, core.settings, metrics)
        on_finished = metrics.job_finished if metrics else None
        jobs = JobRunner(core.db, core.trainer, core.settings, core.quotas, on_finished=on_finished)
        return cls(core, predictor, jobs, Tenants(core.db, core.settings), metrics=metrics)

    @property
    def settings(self) -> Settings:
        return self.core.settings

    @property
    def accepting(self) -> bool:
        """Whether this worker takes API calls at all: the registry answers and the worker is not draining."""
        return self.registry_reachable and not self.draining

    @property
    def ready(self) -> bool:
        """What ``/readyz`` and gRPC health (overall and PredictionService) report: accepting calls and
        serving predictions, which a replica that only trains never does."""
        return self.not_ready_reason is None

    @property
    def not_ready_reason(self) -> str | None:
        """Why this worker is not ready, for a person reading ``/readyz``; None when it is."""
        if self.draining:
            return "this replica is shutting down; another replica answers"
        if not self.registry_reachable:
            return "this replica cannot reach its registry database"
        if self.settings.role == "train":
            return TRAINING_ONLY
        return None

    async def in_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in the store pool: a registry call never blocks the event loop."""
        return await run_in(self.pools.store, fn, *args, **kwargs)

    async def authenticate(self, authorization: str | None) -> str:
        """The caller's tenant; the key lookup hits the database, so it runs in the authentication pool."""
        return await run_in(self.pools.auth, self.tenants.authenticate, authorization)

    async def start(self) -> None:
        """Call from inside the serving event loop."""
        await self.jobs.start()
        await self.batches.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._probe_forever(), name="registry-probe"),
            loop.create_task(self._collect_forever(), name="blob-collector"),
            loop.create_task(self.monitor.run(), name="observation-flusher"),
            loop.create_task(self.deliveries.run(), name="webhook-deliveries"),
        ]

    async def drain(self, grace_s: float) -> None:
        """Stop taking work and finish what is in flight, within ``grace_s``: new calls are refused
        (Unavailable: clients retry on another replica), running jobs go back to the queue for another
        replica, and admitted HTTP calls get their answers."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + grace_s
        # Stay up, not ready, for a moment even when idle: a replica that vanished the instant it was
        # asked to stop would give no readiness probe (a load balancer's, a test's) the chance to see it go.
        notice = asyncio.sleep(min(DRAIN_NOTICE_S, grace_s))
        await asyncio.gather(self.jobs.stop(), self.batches.stop(), self._http_idle(deadline), notice)

    async def stop(self) -> None:
        """Call after the doors stopped: nothing submits work to the pools any more."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.jobs.stop()
        self.jobs.close()
        await self.batches.stop()
        await self.predictor.stop()
        try:
            await self.monitor.flush()  # what this replica observed last
        except Exception:
            log.exception("could not write the last observations to the registry")
        self.deliveries.close()
        self.pools.shutdown()
        self.exports.shutdown()

    async def _http_idle(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.http_in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def _collect_forever(self) -> None:
        """Orphaned blobs and cached features (deleted datasets' images, a crashed upload's or job's files), after
        their grace, expired idempotency keys and expired prediction records."""
        while True:
            await asyncio.sleep(self.settings.gc_interval_s)
            try:
                images = await self.in_thread(self.core.datasets.collect_garbage)
                weights = await self.in_thread(self.core.heads.collect_orphans, self.settings.blob_grace_s)
                features = await self.in_thread(self.core.extractor.cache.collect_garbage)
                await self.in_thread(self.requests.collect_expired)
                await self.in_thread(self.monitor.observations.collect_expired)
                if images or weights or features:
                    log.info(
                        "collected %d orphaned image blob(s), %d weight file(s) and %d feature entries",
                        images,
                        weights,
                        features,
                    )
            except Exception:
                log.exception("blob collection failed; trying again in %.0f s", self.settings.gc_interval_s)

    async def _probe_forever(self) -> None:
        """``SELECT 1`` every few seconds, in a thread of its own; readiness checks only read the flag it keeps."""
        while True:
            reachable = await run_in(self.pools.probe, self._registry_answers)
            if reachable != self.registry_reachable:
                log.warning("registry database is %s", "reachable again" if reachable else "unreachable: not ready")
            self.registry_reachable = reachable
            await asyncio.sleep(self.probe_interval_s)

    def _registry_answers(self) -> bool:
        try:
            with self.core.db.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception as exc:  # any failure means "not ready"; the log says why
            log.debug("registry probe failed: %s", exc)
            return False
