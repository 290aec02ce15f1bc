"""graft.v1 services: parse, authenticate, call the runtime, map the result.

No behaviour lives here that HTTP lacks; errors map to status codes in
service/grpc/errors.py. Nothing here touches the database on the event loop
(it also runs the batcher): authentication and store calls go through
service/calls.py.
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
from google.protobuf import empty_pb2

from service.calls import KeyCheck, authenticate, in_thread, while_key_valid
from service.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from service.grpc import convert
from service.grpc.errors import mapped_errors, status_of
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.runtime import Runtime
from service.store.archives import Example
from service.store.datasets import UploadBudget

EXPORT_CHUNK_BYTES = 1 << 20
UPLOAD_QUEUE_IMAGES = 4  # images one CreateDataset stream holds between reading and validating them
_END = object()


class _Door:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.core = runtime.core

    async def tenant(self, context: grpc.aio.ServicerContext) -> str:
        return await authenticate(self.runtime.tenants, _authorization(context))

    async def key_check(self, context: grpc.aio.ServicerContext) -> KeyCheck:
        """Authenticate a stream's caller, keeping the key to check again while the stream is open."""
        authorization = _authorization(context)
        tenant = await authenticate(self.runtime.tenants, authorization)
        return KeyCheck(self.runtime.tenants, authorization, tenant, self.core.settings.key_recheck_s)


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return dict(context.invocation_metadata() or ()).get("authorization")


class BackboneService(_Door, rpc.BackboneServiceServicer):
    @mapped_errors
    async def GetBackbone(self, request, context):
        await self.tenant(context)
        return convert.backbone(self.core.backbone_info(convert.resource_id(request.name, "backbones")))

    @mapped_errors
    async def ListBackbones(self, request, context):
        await self.tenant(context)
        return api.ListBackbonesResponse(backbones=[convert.backbone(b.info()) for b in self.core.backbones.values()])


class InflightBytes:
    """Bytes held by all CreateDataset streams of this worker together, bounded by one setting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        with self._lock:
            if self.held + size > self.limit:
                raise ResourceExhausted(
                    f"uploads in progress already hold {self.held:,} bytes; this image would take them over the "
                    f"limit of {self.limit:,} (GRAFT_MAX_INFLIGHT_UPLOAD_BYTES); retry shortly",
                    retry_after_s=5.0,
                )
            self.held += size

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held -= size


class DatasetService(_Door, rpc.DatasetServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.inflight = InflightBytes(runtime.settings.max_inflight_upload_bytes)

    @mapped_errors
    async def CreateDataset(self, request_iterator, context):
        """The store validates images as they arrive, a few at a time, so a stream never holds the whole upload."""
        tenant = await self.tenant(context)
        limit = self.core.settings.upload_timeout_s
        try:
            async with asyncio.timeout(limit):
                return convert.dataset(await self._create(tenant, request_iterator))
        except TimeoutError:
            raise DeadlineExceeded(
                f"the upload did not finish within {limit:g} s (GRAFT_UPLOAD_TIMEOUT_S); "
                "send smaller datasets or a faster stream"
            ) from None

    async def _create(self, tenant: str, request_iterator: AsyncIterator[api.CreateDatasetRequest]):
        first = await anext(request_iterator, None)
        if first is None:
            raise InvalidArgument("the stream was empty: send a header, then the images")
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message must carry the header (display_name)")
        queue: asyncio.Queue = asyncio.Queue(UPLOAD_QUEUE_IMAGES)
        store = asyncio.ensure_future(in_thread(
            self.core.datasets.create, tenant, first.header.display_name,
            self._examples(queue, asyncio.get_running_loop()),
        ))  # fmt: skip
        try:
            budget = UploadBudget(self.core.settings)
            count = 0
            async for message in request_iterator:
                example = _example(message, count)
                budget.take(example[0], len(example[1]))
                self.inflight.take(len(example[1]))
                if not await _put_unless_done(queue, example, store):
                    self.inflight.give_back(len(example[1]))
                    break  # the store refused an image: its error is the answer
                count += 1
            else:
                await _put_unless_done(queue, _END, store)
            return await store
        finally:
            if not store.done():
                _abandon(queue, self.inflight)
                await asyncio.gather(store, return_exceptions=True)
            _drain(queue, self.inflight)

    def _examples(self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> Iterator[Example]:
        """In the store's thread: the stream's images in order, each handed back to the budget once validated."""
        held = 0
        try:
            while True:
                item = asyncio.run_coroutine_threadsafe(queue.get(), loop).result()
                self.inflight.give_back(held)
                held = 0
                if item is _END:
                    return
                if item is None:
                    raise Cancelled("the upload was abandoned before it ended; nothing was stored")
                held = len(item[1])
                yield item
        finally:
            self.inflight.give_back(held)

    @mapped_errors
    async def GetDataset(self, request, context):
        tenant = await self.tenant(context)
        return convert.dataset(await in_thread(self.core.datasets.get, tenant,
                                               convert.resource_id(request.name, "datasets")))

    @mapped_errors
    async def ListDatasets(self, request, context):
        tenant = await self.tenant(context)
        datasets, token = await in_thread(self.core.datasets.list, tenant, request.page_size or 50,
                                          request.page_token or None)
        return api.ListDatasetsResponse(datasets=[convert.dataset(d) for d in datasets], next_page_token=token or "")

    @mapped_errors
    async def DeleteDataset(self, request, context):
        tenant = await self.tenant(context)
        await in_thread(self.core.datasets.delete, tenant, convert.resource_id(request.name, "datasets"))
        return empty_pb2.Empty()


def _example(message: api.CreateDatasetRequest, index: int) -> Example:
    part = message.WhichOneof("part")
    if part == "header":
        raise InvalidArgument("send the header once, as the first message")
    if part != "image":
        raise InvalidArgument("each message must carry a header or an image")
    image = message.image
    return image.file_name or f"image {index}", image.data, image.label


async def _put_unless_done(queue: asyncio.Queue, item: object, store: asyncio.Future) -> bool:
    """Queue ``item`` for the store; False if the store ended first (it refused the upload)."""
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, store}, return_when=asyncio.FIRST_COMPLETED)
    if put.done():
        return True
    put.cancel()
    return False


def _drain(queue: asyncio.Queue, inflight: InflightBytes) -> None:
    while not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, tuple):
            inflight.give_back(len(item[1]))


def _abandon(queue: asyncio.Queue, inflight: InflightBytes) -> None:
    """Tell the store's thread to stop: what it has not read is dropped, then it reads the stop sign."""
    _drain(queue, inflight)
    queue.put_nowait(None)


class JobService(_Door, rpc.JobServiceServicer):
    @mapped_errors
    async def CreateJob(self, request, context):
        tenant = await self.tenant(context)
        return convert.job(await self.runtime.jobs.submit(tenant, convert.train_request(request.spec)))

    @mapped_errors
    async def GetJob(self, request, context):
        tenant = await self.tenant(context)
        return convert.job(await in_thread(self.runtime.jobs.get, tenant, convert.resource_id(request.name, "jobs")))

    @mapped_errors
    async def ListJobs(self, request, context):
        tenant = await self.tenant(context)
        jobs, token = await in_thread(self.runtime.jobs.list, tenant, request.page_size or 50,
                                      request.page_token or None)
        return api.ListJobsResponse(jobs=[convert.job(j) for j in jobs], next_page_token=token or "")

    @mapped_errors
    async def CancelJob(self, request, context):
        tenant = await self.tenant(context)
        return convert.job(await self.runtime.jobs.cancel(tenant, convert.resource_id(request.name, "jobs")))

    @mapped_errors
    async def WatchJob(self, request, context):
        key = await self.key_check(context)
        updates = self.runtime.jobs.watch(key.tenant, convert.resource_id(request.name, "jobs"))
        async for job in while_key_valid(updates, key):
            yield convert.job(job)


class HeadService(_Door, rpc.HeadServiceServicer):
    @mapped_errors
    async def GetHead(self, request, context):
        tenant = await self.tenant(context)
        return convert.head(await in_thread(self.core.heads.get, tenant, convert.resource_id(request.name, "heads")))

    @mapped_errors
    async def ListHeads(self, request, context):
        tenant = await self.tenant(context)
        heads, token = await in_thread(self.core.heads.list, tenant, request.page_size or 50,
                                       request.page_token or None)
        return api.ListHeadsResponse(heads=[convert.head(h) for h in heads], next_page_token=token or "")

    @mapped_errors
    async def DeleteHead(self, request, context):
        tenant = await self.tenant(context)
        await in_thread(self.core.heads.delete_head, tenant, convert.resource_id(request.name, "heads"))
        return empty_pb2.Empty()

    @mapped_errors
    async def DeleteHeadVersion(self, request, context):
        name, version = convert.head_version_ref(request.name)
        tenant = await self.tenant(context)
        await in_thread(self.core.heads.delete_version, tenant, name, version)
        return empty_pb2.Empty()

    @mapped_errors
    async def SetAlias(self, request, context):
        name = convert.resource_id(request.name, "heads")
        alias = convert.check_printable("alias", request.alias)
        tenant = await self.tenant(context)
        await in_thread(self.core.heads.set_alias, tenant, name, alias, request.version)
        return convert.head(await in_thread(self.core.heads.get, tenant, name))

    @mapped_errors
    async def ExportHead(self, request, context):
        [ref] = convert.head_refs([request.head])
        tenant = await self.tenant(context)
        info = await in_thread(self.core.heads.resolve, tenant, ref)
        data = await in_thread(self.core.heads.head_blob_bytes, info)
        for start in range(0, len(data), EXPORT_CHUNK_BYTES):
            yield api.ExportHeadResponse(chunk=data[start : start + EXPORT_CHUNK_BYTES])


class PredictionService(_Door, rpc.PredictionServiceServicer):
    @mapped_errors
    async def Predict(self, request, context):
        heads = convert.head_refs(list(request.heads))
        tenant = await self.tenant(context)
        work = self.runtime.predictor.predict(tenant, list(request.images), heads,
                                              top_k=request.top_k or 5, embedding=request.include_embedding, door="grpc")
        remaining = context.time_remaining()
        try:
            predictions = await (asyncio.wait_for(work, remaining) if remaining is not None else work)
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed before the prediction was ready") from None
        return api.PredictResponse(predictions=[convert.image_prediction(p) for p in predictions])

    @mapped_errors
    async def StreamPredict(self, request_iterator, context):
        """Each request is predicted concurrently; a failed image answers with its error, the stream goes on.

        One stream has at most ``max_images_per_request`` requests between being read and being answered
        (as many as one Predict call): past that it stops reading, so a client that sends faster than the
        engine predicts is slowed by flow control instead of queueing unbounded work. The key is checked
        again every ``key_recheck_s``: revoking it ends the stream with UNAUTHENTICATED.
        """
        key = await self.key_check(context)
        responses: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self.core.settings.max_images_per_request)

        async def answer(message) -> None:
            try:
                [prediction] = await self.runtime.predictor.predict(
                    key.tenant, [message.image], convert.head_refs(list(message.heads)), top_k=message.top_k or 5,
                    embedding=message.include_embedding, door="grpc",
                )  # fmt: skip
                response = api.StreamPredictResponse(request_id=message.request_id,
                                                     prediction=convert.image_prediction(prediction))
            except Exception as exc:
                code, text = status_of(exc)
                response = api.StreamPredictResponse(request_id=message.request_id, error_code=code.value[0],
                                                     error_message=text)
            await responses.put(response)

        async def read_all() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    async for message in request_iterator:
                        await window.acquire()
                        group.create_task(answer(message))
            finally:
                await responses.put(None)  # every request answered (or the stream broke)

        async def answers() -> AsyncIterator[api.StreamPredictResponse]:
            while (response := await responses.get()) is not None:
                yield response

        reader = asyncio.create_task(read_all())
        try:
            async for response in while_key_valid(answers(), key):
                yield response
                window.release()
        finally:
            reader.cancel()  # a no-op once every request was answered; else the client left: drop its work
            await asyncio.gather(reader, return_exceptions=True)
        await reader  # surfaces a broken request stream


SERVICES = (BackboneService, DatasetService, JobService, HeadService, PredictionService)
