"""What both doors do around a call: authenticate, reach the store off the event loop, re-check open streams,
and the calls themselves (``Calls``), so that a door only decodes a request, calls, and encodes the result.

The event loop also runs the batcher, so one database round trip on it stalls
every prediction in flight. Store calls run in their own small pool, so image
decoding in the default pool cannot starve them. Authentication (and key
re-checks) and the readiness probe have pools of their own, and dataset uploads
another, bounded one: no number of uploads, however slow their clients, can hold
the threads that every other call needs. A streaming upload takes an upload
thread only while one of its images is validated, never while it waits for the
client's next message. The pools (``Pools``) and the export queue belong to the
runtime that made them, so two runtimes in one process share none of them.
"""

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from adapters.active import Strategy
from service import export
from service.auditing import DEFAULT_AUDIT_ITEMS, AuditRequest
from service.auth import NewKey
from service.batch.results import ResultsFormat, render
from service.config import Settings
from service.engine.predictor import ImagePrediction
from service.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from service.monitoring_report import monitored_ref, monitoring_report
from service.prediction_options import PredictOptions
from service.resources import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Backbone,
    BatchPrediction,
    BatchPredictionSpec,
    BatchUpdateExamplesResponse,
    CompareHeadVersionsResponse,
    CreateWebhookRequest,
    Dataset,
    DatasetAudit,
    Example,
    ExampleLabel,
    ExportedHead,
    ExportFormat,
    Head,
    HeadComparison,
    HeadMonitoring,
    HeadVersion,
    ImportLabelsResponse,
    Job,
    ListBackbonesResponse,
    ListBatchPredictionsResponse,
    ListDatasetsResponse,
    ListExamplesResponse,
    ListHeadsResponse,
    ListJobsResponse,
    ListWebhookDeliveriesResponse,
    ListWebhooksResponse,
    PredictionFeedback,
    SuggestExamplesResponse,
    TrainingSpec,
    Webhook,
    WebhookDelivery,
    head_ref,
    head_version_ref,
    resource_id,
)
from service.store.datasets import DatasetInfo, DatasetUpload
from service.store.images import image_content_type
from service.store.labels import LabelUpdate
from service.store.requests import ADMIN_SCOPE, fingerprint, seal, unseal
from service.suggestions import SuggestRequest

if TYPE_CHECKING:  # the runtime uses this module's pools and export queue
    from service.runtime import Runtime

P = ParamSpec("P")
T = TypeVar("T")

AUTH_THREADS = 4  # key lookups at once: each is short, and none waits behind a store call


class Pools:
    """The thread pools of one runtime, one per kind of work, so that no kind can take the threads another needs."""

    def __init__(self, settings: Settings) -> None:
        self.store = ThreadPoolExecutor(settings.store_threads, thread_name_prefix="store")  # registry calls
        self.auth = ThreadPoolExecutor(AUTH_THREADS, thread_name_prefix="auth")
        self.probe = ThreadPoolExecutor(1, thread_name_prefix="probe")  # the readiness probe's SELECT 1, alone
        self.upload = ThreadPoolExecutor(settings.upload_threads, thread_name_prefix="upload")

    def shutdown(self) -> None:
        """Stop every pool's threads once they finish what runs; work still queued is cancelled."""
        for pool in (self.store, self.auth, self.probe, self.upload):
            pool.shutdown(wait=False, cancel_futures=True)


async def run_in(pool: ThreadPoolExecutor, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in ``pool``, awaited from the event loop."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(pool, call)


class Upload:
    """A dataset upload that a door feeds one image at a time; each step runs in the upload pool.

    A step cancelled from the event loop (the client left, the upload timed out) still ends in its thread
    before ``abandon`` runs, so nothing is pinned after the upload released its images.
    """

    def __init__(self, upload: DatasetUpload, pool: ThreadPoolExecutor) -> None:
        self._upload = upload
        self._pool = pool
        self._step: asyncio.Future[Any] | None = None

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        step = asyncio.get_running_loop().run_in_executor(self._pool, call)
        self._step = step
        return await asyncio.shield(step)

    async def add(self, file_name: str, data: bytes, label: str, client_id: str | None = None) -> None:
        await self._run(self._upload.add, file_name, data, label, client_id)

    async def commit(self) -> Dataset:
        return Dataset.of(await self._run(self._upload.commit))

    async def abandon(self) -> None:
        if self._step is not None and not self._step.done():
            await asyncio.wait({self._step})
        await run_in(self._pool, self._upload.abandon)


class InflightBytes:
    """Bytes held by all dataset uploads of this worker together (HTTP bodies and gRPC streams), bounded by
    GRAFT_MAX_INFLIGHT_UPLOAD_BYTES: past it an upload is refused with a retry hint, never queued in memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int, what: str = "this image") -> None:
        with self._lock:
            if self.held + size > self.limit:
                raise ResourceExhausted(
                    f"uploads in progress already hold {self.held:,} bytes; {what} would take them over the "
                    f"limit of {self.limit:,} (GRAFT_MAX_INFLIGHT_UPLOAD_BYTES); retry shortly",
                    retry_after_s=5.0,
                )
            self.held += size

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held -= size


class ExportQueue:
    """Model exports run one at a time per replica, off the event loop: each takes seconds of every core.

    A few (``waiting``: GRAFT_MAX_WAITING_EXPORTS) wait their turn; more are refused with a retry hint rather
    than left waiting for minutes. The places are shared fairly: one tenant holds at most ``per_tenant`` of them
    (one running + one waiting), so no tenant can fill the queue, and when an export ends the next to run is the
    oldest waiting one of another tenant than the one that just ran, if there is one. Only the event loop touches
    the counts.
    """

    def __init__(self, waiting: int, per_tenant: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export")
        self._limit = waiting + 1
        self._per_tenant = per_tenant
        self._admitted: Counter[str] = Counter()  # per tenant: running or waiting
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []  # oldest first
        self._running: str | None = None  # the tenant whose export has the turn
        self._last: str | None = None  # the tenant whose export ran last

    def shutdown(self) -> None:
        """End the export thread once the running export finishes; nothing waits for it."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, tenant: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._admitted[tenant] >= self._per_tenant:
            raise ResourceExhausted(
                f"{self._admitted[tenant]} model exports of yours are already running or waiting on this replica, "
                "the most one tenant may have; retry when one has finished",
                retry_after_s=30.0,
            )
        if self._admitted.total() >= self._limit:
            raise ResourceExhausted(
                f"{self._admitted.total()} model exports are already running or waiting on this replica; "
                "retry in a minute",
                retry_after_s=30.0,
            )
        self._admitted[tenant] += 1
        try:
            await self._turn(tenant)
            try:
                call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
                return await asyncio.get_running_loop().run_in_executor(self._pool, call)
            finally:
                self._running, self._last = None, tenant
                self._hand_on()
        finally:
            self._admitted[tenant] -= 1
            if not self._admitted[tenant]:
                del self._admitted[tenant]

    async def _turn(self, tenant: str) -> None:
        """Return once ``tenant``'s export has the turn (``_running`` is then ``tenant``)."""
        if self._running is None and not self._waiting:
            self._running = tenant
            return
        entry = (tenant, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:  # the caller left while waiting
            if entry in self._waiting:
                self._waiting.remove(entry)
            elif self._running == tenant:  # handed the turn just as it left: pass it on
                self._running = None
                self._hand_on()
            raise

    def _hand_on(self) -> None:
        """Give the free turn to the oldest waiting export of another tenant than the last to run, else the oldest."""
        if self._running is not None or not self._waiting:
            return
        index = next((i for i, (tenant, _) in enumerate(self._waiting) if tenant != self._last), 0)
        tenant, turn = self._waiting.pop(index)
        self._running = tenant
        turn.set_result(None)


class KeyCheck:
    """The key of an open stream, checked again every ``every_s`` so that revoking it ends the stream."""

    def __init__(self, runtime: "Runtime", authorization: str | None, tenant: str, every_s: float) -> None:
        self.runtime = runtime
        self.authorization = authorization
        self.tenant = tenant
        self.every_s = every_s
        self.checked_at = time.monotonic()

    def seconds_left(self) -> float:
        return max(0.0, self.checked_at + self.every_s - time.monotonic())

    async def recheck_if_due(self) -> None:
        """Raise Unauthenticated if the key was revoked (or now names another tenant)."""
        if self.seconds_left() > 0:
            return
        if await self.runtime.authenticate(self.authorization) != self.tenant:
            raise Unauthenticated("invalid API key")
        self.checked_at = time.monotonic()


async def while_key_valid(stream: AsyncIterator[T], key: KeyCheck) -> AsyncGenerator[T, None]:
    """The items of ``stream``; ends with Unauthenticated once ``key`` stops working, even while no item comes."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait({pending}, timeout=key.seconds_left())
            await key.recheck_if_due()
            if not done:
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class Calls:
    """What a caller can do, door-independent: each door decodes a request, calls one method, encodes the result.

    Defaults (page size), pagination, and running store calls off the event
    loop live here once; the results are the contract's resources (service/resources.py).
    """

    def __init__(self, runtime: "Runtime", key: KeyCheck) -> None:
        self.runtime = runtime
        self.core = runtime.core
        self.in_thread = runtime.in_thread  # store calls run in the runtime's store pool
        self.key = key  # streams check it again while they are open
        self.tenant = key.tenant

    @classmethod
    async def authenticate(cls, runtime: "Runtime", authorization: str | None) -> "Calls":
        """The caller's calls; the key lookup hits the database, so it runs in the authentication pool."""
        tenant = await runtime.authenticate(authorization)
        return cls(runtime, KeyCheck(runtime, authorization, tenant, runtime.settings.key_recheck_s))

    # -- backbones -------------------------------------------------------------------

    def list_backbones(self) -> ListBackbonesResponse:
        return ListBackbonesResponse(backbones=[Backbone.of(b.info()) for b in self.core.backbones.values()])

    def get_backbone(self, name: str) -> Backbone:
        return Backbone.of(self.core.backbone_info(resource_id(name, "backbones")))

    # -- datasets --------------------------------------------------------------------

    async def create_dataset(
        self, create: Callable[..., DatasetInfo], display_name: str, *args: object, request_id: str | None = None
    ) -> Dataset:
        """``create(tenant, display_name, *args)``: one of the store's create_from_* methods over a body already
        received (files, a zip), run in the upload pool; once per ``request_id`` (see ``dataset_once``)."""

        async def run() -> Dataset:
            return Dataset.of(await run_in(self.runtime.pools.upload, create, self.tenant, display_name, *args))

        return await self.dataset_once(display_name, request_id, run)

    async def dataset_once(
        self, display_name: str, request_id: str | None, create: Callable[[], Awaitable[Dataset]]
    ) -> Dataset:
        """``create()`` unless an earlier upload with this idempotency key made a dataset: then that one. The
        request's fingerprint is its display name only (the images are checked as they stream in, after this)."""
        request = fingerprint(display_name)
        return await once(
            self.runtime, self.tenant, request_id, "create_dataset", request, create, lambda d: d.name, self.get_dataset
        )

    async def begin_upload(self, display_name: str) -> Upload:
        """A dataset a stream sends one image at a time: ``add`` each, then ``commit``, or ``abandon``."""
        pool = self.runtime.pools.upload
        return Upload(await run_in(pool, self.core.datasets.begin, self.tenant, display_name), pool)

    async def get_dataset(self, name: str) -> Dataset:
        return Dataset.of(await self.in_thread(self.core.datasets.get, self.tenant, resource_id(name, "datasets")))

    async def list_datasets(self, page_size: int, page_token: str) -> ListDatasetsResponse:
        datasets, token = await self.in_thread(self.core.datasets.list, self.tenant, *_page(page_size, page_token))
        return ListDatasetsResponse(datasets=[Dataset.of(d) for d in datasets], next_page_token=token or "")

    async def list_examples(self, parent: str, page_size: int, page_token: str) -> ListExamplesResponse:
        dataset_id = resource_id(parent, "datasets")
        store = self.core.datasets
        examples, token = await self.in_thread(
            store.list_examples, self.tenant, dataset_id, *_page(page_size, page_token)
        )
        return ListExamplesResponse(examples=[Example.of(dataset_id, e) for e in examples], next_page_token=token or "")

    async def get_example(self, dataset: str, example: str) -> Example:
        """``dataset`` is its id or name; ``example`` a client id or a position (gRPC passes both from one name)."""
        dataset_id = resource_id(dataset, "datasets")
        found = await self.in_thread(self.core.datasets.get_example, self.tenant, dataset_id, example)
        return Example.of(dataset_id, found)

    async def get_example_image(self, dataset: str, example: str) -> tuple[str, bytes]:
        """(content type, bytes) of an example's image as uploaded."""
        dataset_id = resource_id(dataset, "datasets")
        found = await self.in_thread(self.core.datasets.get_example, self.tenant, dataset_id, example)
        data = await self.in_thread(self.core.datasets.read_image, found.image_sha256)
        return image_content_type(data), data

    async def update_example(self, dataset: str, example: str, label: str | None, update_mask: str) -> Example:
        """Label one example (None or empty: unlabel it). ``update_mask``: empty, "*" or "label" (comma-separated
        field paths, as AIP-134 writes them)."""
        paths = {path.strip() for path in update_mask.split(",") if path.strip()}
        if not paths <= {"label", "*"}:
            raise InvalidArgument(
                f"update_mask {update_mask[:200]!r} names fields that cannot change; of an example only 'label' can"
            )
        dataset_id = resource_id(dataset, "datasets")
        update = LabelUpdate(example=example, label=label or None)
        (updated,) = await self.in_thread(self.core.labels.update, self.tenant, dataset_id, [update])
        return Example.of(dataset_id, updated)

    async def batch_update_examples(self, parent: str, updates: list[ExampleLabel]) -> BatchUpdateExamplesResponse:
        dataset_id = resource_id(parent, "datasets")
        changes = [LabelUpdate(example=u.example, label=u.label or None) for u in updates]
        updated = await self.in_thread(self.core.labels.update, self.tenant, dataset_id, changes)
        return BatchUpdateExamplesResponse(examples=[Example.of(dataset_id, e) for e in updated])

    async def import_labels(self, parent: str, csv: bytes) -> ImportLabelsResponse:
        dataset_id = resource_id(parent, "datasets")
        imported = await self.in_thread(self.core.labels.import_csv, self.tenant, dataset_id, csv)
        dataset = await self.in_thread(self.core.datasets.get, self.tenant, dataset_id)
        return ImportLabelsResponse(row_count=imported.rows, dataset=Dataset.of(dataset))

    async def delete_dataset(self, name: str) -> None:
        await self.in_thread(self.core.datasets.delete, self.tenant, resource_id(name, "datasets"))

    async def audit_dataset(
        self, name: str, backbone: str, max_suspects: int, max_duplicates: int, duplicate_similarity: float | None
    ) -> DatasetAudit:
        """Label suspects and cross-label duplicates; the features may need the trunk, so it runs in a thread
        of its own, not the store pool, and stops when this call is cancelled. Empty or 0 arguments take their
        defaults."""
        request = AuditRequest(
            dataset_id=resource_id(name, "datasets"),
            backbone=backbone or None,
            max_suspects=max_suspects or DEFAULT_AUDIT_ITEMS,
            max_duplicates=max_duplicates or DEFAULT_AUDIT_ITEMS,
            **({} if duplicate_similarity is None else {"duplicate_similarity": duplicate_similarity}),
        )
        cancel = threading.Event()
        try:
            audited = await asyncio.to_thread(
                self.core.auditor.audit, self.tenant, request, cancel, self.runtime.audit_slots
            )
            return DatasetAudit.of(audited)
        finally:
            # Also when this call was cancelled (gRPC: the client cancelled; HTTP: it disconnected, see
            # service/http/datasets.py): the thread stops at its next check and frees the audit slot.
            cancel.set()

    async def suggest_examples(
        self, name: str, head: str, count: int, strategy: Strategy | None, seed: int
    ) -> SuggestExamplesResponse:
        """The dataset's unlabelled images worth labelling next for ``head``; run like an audit (a thread of its
        own, an audit slot, stopped when this call is cancelled). 0 or None arguments take their defaults."""
        request = SuggestRequest(
            dataset_id=resource_id(name, "datasets"),
            head=head,
            seed=seed,
            **({"count": count} if count else {}),
            **({"strategy": strategy} if strategy is not None else {}),
        )
        cancel = threading.Event()
        try:
            found = await asyncio.to_thread(
                self.core.suggester.suggest, self.tenant, request, cancel, self.runtime.audit_slots
            )
            return SuggestExamplesResponse.of(found)
        finally:
            cancel.set()

    # -- jobs ------------------------------------------------------------------------

    async def create_job(self, spec: TrainingSpec, request_id: str | None = None) -> Job:
        """A queued job; with ``request_id``, the same job for every repeat of the same spec (one is created)."""

        async def submit() -> Job:
            return Job.of(await self.runtime.jobs.submit(self.tenant, spec.request()))

        request = fingerprint(spec.model_dump_json())
        return await once(
            self.runtime, self.tenant, request_id, "create_job", request, submit, lambda job: job.name, self.get_job
        )

    async def get_job(self, name: str) -> Job:
        return Job.of(await self.in_thread(self.runtime.jobs.get, self.tenant, resource_id(name, "jobs")))

    async def list_jobs(self, page_size: int, page_token: str) -> ListJobsResponse:
        jobs, token = await self.in_thread(self.runtime.jobs.list, self.tenant, *_page(page_size, page_token))
        return ListJobsResponse(jobs=[Job.of(j) for j in jobs], next_page_token=token or "")

    async def cancel_job(self, name: str) -> Job:
        return Job.of(await self.runtime.jobs.cancel(self.tenant, resource_id(name, "jobs")))

    async def watch_job(self, name: str) -> AsyncIterator[Job]:
        """The job now (NotFound, or ResourceExhausted past GRAFT_MAX_WATCHES_PER_TENANT, before anything is
        sent), then on every change until done; Unauthenticated once the key is revoked."""
        updates = self.runtime.jobs.watch(self.tenant, resource_id(name, "jobs"))
        first = await anext(updates)

        async def jobs() -> AsyncIterator[Job]:
            try:
                yield Job.of(first)
                async with contextlib.aclosing(while_key_valid(updates, self.key)) as stream:
                    async for job in stream:
                        yield Job.of(job)
            finally:
                await updates.aclose()  # ends the watch (and frees its place) now, not when collected

        return jobs()

    # -- batch predictions -------------------------------------------------------------

    async def create_batch_prediction(
        self, spec: BatchPredictionSpec, request_id: str | None = None
    ) -> BatchPrediction:
        """A queued batch prediction; with ``request_id``, the same one for every repeat of the same spec."""
        batches = self.runtime.batches

        async def submit() -> BatchPrediction:
            refs = [head_ref(ref) for ref in spec.heads]
            dataset_id = resource_id(spec.dataset, "datasets")
            return BatchPrediction.of(await batches.create(self.tenant, refs, dataset_id, spec.options()))

        request = fingerprint(spec.model_dump_json())
        return await once(
            self.runtime,
            self.tenant,
            request_id,
            "create_batch_prediction",
            request,
            submit,
            lambda batch: batch.name,
            self.get_batch_prediction,
        )

    async def get_batch_prediction(self, name: str) -> BatchPrediction:
        found = await self.in_thread(self.runtime.batches.get, self.tenant, resource_id(name, "batchPredictions"))
        return BatchPrediction.of(found)

    async def list_batch_predictions(self, page_size: int, page_token: str) -> ListBatchPredictionsResponse:
        found, token = await self.in_thread(self.runtime.batches.list, self.tenant, *_page(page_size, page_token))
        return ListBatchPredictionsResponse(
            batch_predictions=[BatchPrediction.of(b) for b in found], next_page_token=token or ""
        )

    async def cancel_batch_prediction(self, name: str) -> BatchPrediction:
        found = await self.in_thread(self.runtime.batches.cancel, self.tenant, resource_id(name, "batchPredictions"))
        return BatchPrediction.of(found)

    async def delete_batch_prediction(self, name: str) -> None:
        await self.in_thread(self.runtime.batches.delete, self.tenant, resource_id(name, "batchPredictions"))

    async def batch_prediction_results(self, name: str, format: ResultsFormat) -> AsyncIterator[bytes]:
        """The results file in pieces (NotFound, or FailedPrecondition before it succeeded, before the first);
        each piece's rows are read in the store pool, never on the event loop."""
        id = resource_id(name, "batchPredictions")
        store = self.runtime.batches.store
        batch = await self.in_thread(store.get, self.tenant, id)
        pieces = render(await self.in_thread(store.results, self.tenant, id), format, batch.heads)
        end = object()

        async def stream() -> AsyncIterator[bytes]:
            while (piece := await self.in_thread(next, pieces, end)) is not end:
                assert isinstance(piece, bytes)
                yield piece

        return stream()

    # -- heads -----------------------------------------------------------------------

    async def get_head(self, name: str) -> Head:
        """The head with its versions' metrics summaries: cheap however many large versions it has."""
        return Head.of(await self.in_thread(self.core.heads.get, self.tenant, resource_id(name, "heads")))

    async def get_head_version(self, name: str) -> HeadVersion:
        """One version with its whole metrics and its aliases."""
        head, version = head_version_ref(name)
        return HeadVersion.of(await self.in_thread(self.core.heads.describe, self.tenant, f"{head}@{version}"))

    async def list_heads(self, page_size: int, page_token: str) -> ListHeadsResponse:
        heads, token = await self.in_thread(self.core.heads.list, self.tenant, *_page(page_size, page_token))
        return ListHeadsResponse(heads=[Head.of(h) for h in heads], next_page_token=token or "")

    async def delete_head(self, name: str) -> None:
        await self.in_thread(self.core.heads.delete_head, self.tenant, resource_id(name, "heads"))

    async def delete_head_version(self, name: str) -> None:
        await self.in_thread(self.core.heads.delete_version, self.tenant, *head_version_ref(name))

    async def set_alias(self, name: str, alias: str, version: int) -> Head:
        head = resource_id(name, "heads")
        await self.in_thread(self.core.heads.set_alias, self.tenant, head, alias, version)
        return await self.get_head(head)

    async def remove_alias(self, name: str, alias: str) -> None:
        await self.in_thread(self.core.heads.remove_alias, self.tenant, resource_id(name, "heads"), alias)

    async def set_shadow(self, name: str, version: int) -> Head:
        head = resource_id(name, "heads")
        await self.in_thread(self.core.heads.set_shadow, self.tenant, head, version)
        return await self.get_head(head)

    async def clear_shadow(self, name: str) -> Head:
        head = resource_id(name, "heads")
        await self.in_thread(self.core.heads.clear_shadow, self.tenant, head)
        return await self.get_head(head)

    async def compare_head_versions(self, name: str) -> CompareHeadVersionsResponse:
        """The head's comparisons over every replica, this replica's latest predictions included."""
        head = resource_id(name, "heads")
        info = await self.get_head(head)  # NotFound for an unknown head (or another tenant's)
        await self.runtime.monitor.flush()
        comparisons = await self.in_thread(self.runtime.monitor.observations.comparisons, self.tenant, head)
        return CompareHeadVersionsResponse(
            head=info.name.removeprefix("heads/"),
            comparisons=[HeadComparison.model_validate(c.model_dump()) for c in comparisons],
        )

    async def head_monitoring(self, name: str) -> HeadMonitoring:
        """'heads/{head}' (the version it serves by default) or 'heads/{head}/versions/{version}': its drift status
        and every replica's windows, this replica's full ones written first."""
        info = await self.in_thread(self.core.heads.resolve, self.tenant, monitored_ref(name))  # 404: not theirs
        monitor = self.runtime.monitor
        await monitor.flush()
        registry = self.core.heads
        return await self.in_thread(monitoring_report, registry, monitor.window_store, monitor.observations, info)

    async def clear_head_drift(self, name: str) -> HeadMonitoring:
        """Back to 'ok': the caller looked at the traffic and accepts it."""
        head, version = head_version_ref(name)
        await self.in_thread(self.core.heads.resolve, self.tenant, f"{head}@{version}")  # 404: not theirs
        await self.in_thread(self.runtime.monitor.window_store.clear_drift, self.tenant, head, version)
        return await self.head_monitoring(name)

    async def export_head(self, ref: str, format: ExportFormat, additional_heads: Sequence[str] = ()) -> ExportedHead:
        """Safetensors weights as stored, or one model file of backbone + heads (built and checked: seconds)."""
        if 1 + len(additional_heads) > export.MAX_HEADS:
            raise InvalidArgument(f"{1 + len(additional_heads)} heads in one export; the limit is {export.MAX_HEADS}")
        heads = self.core.heads
        infos = [await self.in_thread(heads.resolve, self.tenant, head_ref(r)) for r in [ref, *additional_heads]]
        first = infos[0]
        if format is ExportFormat.SAFETENSORS:
            if additional_heads:
                raise InvalidArgument("safetensors holds one head's weights; export several heads as onnx or pt2")
            data = await self.in_thread(heads.head_blob_bytes, first)
            return ExportedHead(file_name=f"{first.name}-v{first.version}.safetensors", data=data)
        export.check_same_backbone(infos)
        names = export.output_names(infos)
        backbone = self.core.trainer.backbone(first.backbone)
        export.check_file_size(backbone, infos, self.core.settings.max_export_bytes)  # before any weight is read
        datasets = [info.dataset_id for info in infos]
        build = export.export_onnx if format is ExportFormat.ONNX else export.export_pt2
        max_pixels = self.core.settings.max_image_pixels
        tenant, store = self.tenant, self.core.datasets

        def load_and_build() -> bytes:  # in its turn: a waiting export holds no weights
            tensors = [heads.load_tensors(info) for info in infos]
            stored = export.stored_check_images(store, tenant, datasets)
            return build(backbone, infos, tensors, stored, datasets, max_pixels)

        data = await self.runtime.exports.run(self.tenant, load_and_build)
        return ExportedHead(file_name=f"{'+'.join(names)}.{format.value}", data=data)

    # -- webhooks --------------------------------------------------------------------

    async def create_webhook(self, request: CreateWebhookRequest) -> Webhook:
        """A new endpoint with its secret (shown this once). Its host is resolved in the webhook pool: a slow name
        server holds none of the store pool's threads, which every other call needs."""
        store, pool = self.runtime.webhooks, self.runtime.deliveries.pool
        args = (self.tenant, request.url, request.event_types, request.description)
        created = await run_in(pool, store.create, *args)
        return Webhook.of(created.webhook, created.secret)

    async def get_webhook(self, name: str) -> Webhook:
        return Webhook.of(await self.in_thread(self.runtime.webhooks.get, self.tenant, resource_id(name, "webhooks")))

    async def list_webhooks(self, page_size: int, page_token: str) -> ListWebhooksResponse:
        hooks, token = await self.in_thread(self.runtime.webhooks.list, self.tenant, *_page(page_size, page_token))
        return ListWebhooksResponse(webhooks=[Webhook.of(h) for h in hooks], next_page_token=token or "")

    async def delete_webhook(self, name: str) -> None:
        await self.in_thread(self.runtime.webhooks.delete, self.tenant, resource_id(name, "webhooks"))

    async def list_webhook_deliveries(
        self, parent: str, page_size: int, page_token: str
    ) -> ListWebhookDeliveriesResponse:
        webhook_id = resource_id(parent, "webhooks")
        found, token = await self.in_thread(
            self.runtime.webhooks.deliveries, self.tenant, webhook_id, *_page(page_size, page_token)
        )
        return ListWebhookDeliveriesResponse(
            deliveries=[WebhookDelivery.of(d) for d in found], next_page_token=token or ""
        )

    async def test_webhook(self, name: str) -> WebhookDelivery:
        """A ``webhook.test`` event for this endpoint alone, sent by the next delivery round."""
        delivery = await self.in_thread(self.runtime.webhooks.ping, self.tenant, resource_id(name, "webhooks"))
        return WebhookDelivery.of(delivery)

    # -- predictions -----------------------------------------------------------------

    def check_predicting(self) -> None:
        """Raise now what would refuse every prediction of a stream (a replica that only trains): the stream
        fails at once, before a request is read, instead of answering each with the same error."""
        self.runtime.predictor.check_serving()

    async def report_feedback(self, name: str, label: str) -> PredictionFeedback:
        """The true label of a prediction (``predictions/{id}``), counted once for each version that answered."""
        prediction_id = name.removeprefix("predictions/")
        feedback = await self.runtime.monitor.feedback(self.tenant, prediction_id, label)
        return PredictionFeedback.model_validate(feedback.model_dump())

    async def predict(
        self, images: list[bytes], heads: list[str], options: PredictOptions, *, door: str
    ) -> list[ImagePrediction]:
        refs = [head_ref(ref) for ref in heads]
        return await self.runtime.predictor.predict(self.tenant, images, refs, options, door=door)


async def once(
    runtime: "Runtime",
    scope: str,
    request_id: str | None,
    method: str,
    request: str,
    create: Callable[[], Awaitable[T]],
    result_of: Callable[[T], str],
    replay: Callable[[str], Awaitable[T]],
) -> T:
    """``create()`` once per (``scope``, ``request_id``): a repeat within GRAFT_IDEMPOTENCY_TTL_S answers
    ``replay(result)`` of what the first call created (service/store/requests.py). No ``request_id``: just create."""
    if request_id is None:
        return await create()
    requests = runtime.requests
    earlier = await runtime.in_thread(requests.claim, scope, request_id, method, request)
    if earlier is not None:
        return await replay(earlier)
    try:
        created = await create()
    except BaseException:
        # Shielded: a caller that left (cancelled) still frees the key, so its retry runs the call again.
        await asyncio.shield(runtime.in_thread(requests.release, scope, request_id))
        raise
    await asyncio.shield(runtime.in_thread(requests.complete, scope, request_id, result_of(created)))
    return created


async def create_key(runtime: "Runtime", tenant: str, request_id: str | None = None) -> NewKey:
    """The admin's new API key for ``tenant`` (HTTP only); once per ``request_id``. A repeat gives the same key and
    secret back: the secret is kept sealed under the request id, which the registry stores only hashed."""
    tenants = runtime.tenants

    async def create() -> NewKey:
        return await runtime.in_thread(tenants.create_key, tenant)

    def result_of(key: NewKey) -> str:
        return f"{key.key_id}:{seal(key.secret, request_id or '')}"

    async def replay(result: str) -> NewKey:
        key_id, _, sealed = result.partition(":")
        return NewKey(key_id=key_id, tenant=tenant, secret=unseal(sealed, request_id or ""))

    return await once(runtime, ADMIN_SCOPE, request_id, "create_key", fingerprint(tenant), create, result_of, replay)


def _page(page_size: int, page_token: str) -> tuple[int, str | None]:
    """A list call's page: 0 means the default size; an empty token, the first page."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size {page_size} must be from 1 to {MAX_PAGE_SIZE} (0: the default, {DEFAULT_PAGE_SIZE})"
        )
    return page_size or DEFAULT_PAGE_SIZE, page_token or None
