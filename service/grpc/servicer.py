"""graft.v1 services: parse, authenticate, call the runtime, map the result.

No behaviour lives here that HTTP lacks; errors map to status codes in
service/grpc/errors.py.
"""

import asyncio

import grpc
from google.protobuf import empty_pb2

from service.errors import InvalidArgument
from service.grpc import convert
from service.grpc.errors import mapped_errors, status_of
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.runtime import Runtime
from service.store.datasets import UploadBudget

EXPORT_CHUNK_BYTES = 1 << 20


class _Door:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.core = runtime.core

    def tenant(self, context: grpc.aio.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata() or ())
        return self.runtime.tenants.authenticate(metadata.get("authorization"))


class BackboneService(_Door, rpc.BackboneServiceServicer):
    @mapped_errors
    async def GetBackbone(self, request, context):
        self.tenant(context)
        return convert.backbone(self.core.backbone_info(convert.resource_id(request.name, "backbones")))

    @mapped_errors
    async def ListBackbones(self, request, context):
        self.tenant(context)
        return api.ListBackbonesResponse(backbones=[convert.backbone(b.info()) for b in self.core.backbones.values()])


class DatasetService(_Door, rpc.DatasetServiceServicer):
    @mapped_errors
    async def CreateDataset(self, request_iterator, context):
        """Images are held until the store validates them all, so the byte limit is checked as they arrive."""
        tenant = self.tenant(context)
        budget = UploadBudget(self.core.settings)
        header = None
        examples: list[tuple[str, bytes, str]] = []
        async for message in request_iterator:
            part = message.WhichOneof("part")
            if part == "header":
                if header is not None or examples:
                    raise InvalidArgument("send the header once, as the first message")
                header = message.header
            elif part == "image":
                if header is None:
                    raise InvalidArgument("the first message must carry the header (display_name)")
                image = message.image
                file_name = image.file_name or f"image {len(examples)}"
                budget.take(file_name, len(image.data))
                examples.append((file_name, image.data, image.label))
            else:
                raise InvalidArgument("each message must carry a header or an image")
        if header is None:
            raise InvalidArgument("the stream was empty: send a header, then the images")
        info = await asyncio.to_thread(self.core.datasets.create, tenant, header.display_name, examples)
        return convert.dataset(info)

    @mapped_errors
    async def GetDataset(self, request, context):
        return convert.dataset(self.core.datasets.get(self.tenant(context), convert.resource_id(request.name, "datasets")))

    @mapped_errors
    async def ListDatasets(self, request, context):
        datasets, token = self.core.datasets.list(self.tenant(context), request.page_size or 50, request.page_token or None)
        return api.ListDatasetsResponse(datasets=[convert.dataset(d) for d in datasets], next_page_token=token or "")

    @mapped_errors
    async def DeleteDataset(self, request, context):
        await asyncio.to_thread(self.core.datasets.delete, self.tenant(context),
                                convert.resource_id(request.name, "datasets"))
        return empty_pb2.Empty()


class JobService(_Door, rpc.JobServiceServicer):
    @mapped_errors
    async def CreateJob(self, request, context):
        tenant = self.tenant(context)
        return convert.job(await self.runtime.jobs.submit(tenant, convert.train_request(request.spec)))

    @mapped_errors
    async def GetJob(self, request, context):
        return convert.job(self.runtime.jobs.get(self.tenant(context), convert.resource_id(request.name, "jobs")))

    @mapped_errors
    async def ListJobs(self, request, context):
        jobs, token = self.runtime.jobs.list(self.tenant(context), request.page_size or 50, request.page_token or None)
        return api.ListJobsResponse(jobs=[convert.job(j) for j in jobs], next_page_token=token or "")

    @mapped_errors
    async def CancelJob(self, request, context):
        tenant = self.tenant(context)
        return convert.job(await self.runtime.jobs.cancel(tenant, convert.resource_id(request.name, "jobs")))

    @mapped_errors
    async def WatchJob(self, request, context):
        tenant = self.tenant(context)
        async for job in self.runtime.jobs.watch(tenant, convert.resource_id(request.name, "jobs")):
            yield convert.job(job)


class HeadService(_Door, rpc.HeadServiceServicer):
    @mapped_errors
    async def GetHead(self, request, context):
        return convert.head(self.core.heads.get(self.tenant(context), convert.resource_id(request.name, "heads")))

    @mapped_errors
    async def ListHeads(self, request, context):
        heads, token = self.core.heads.list(self.tenant(context), request.page_size or 50, request.page_token or None)
        return api.ListHeadsResponse(heads=[convert.head(h) for h in heads], next_page_token=token or "")

    @mapped_errors
    async def DeleteHead(self, request, context):
        self.core.heads.delete_head(self.tenant(context), convert.resource_id(request.name, "heads"))
        return empty_pb2.Empty()

    @mapped_errors
    async def DeleteHeadVersion(self, request, context):
        name, version = convert.head_version_ref(request.name)
        self.core.heads.delete_version(self.tenant(context), name, version)
        return empty_pb2.Empty()

    @mapped_errors
    async def SetAlias(self, request, context):
        tenant, name = self.tenant(context), convert.resource_id(request.name, "heads")
        self.core.heads.set_alias(tenant, name, request.alias, request.version)
        return convert.head(self.core.heads.get(tenant, name))

    @mapped_errors
    async def ExportHead(self, request, context):
        info = self.core.heads.resolve(self.tenant(context), request.head)
        data = await asyncio.to_thread(self.core.heads.head_blob_bytes, info)
        for start in range(0, len(data), EXPORT_CHUNK_BYTES):
            yield api.ExportHeadResponse(chunk=data[start : start + EXPORT_CHUNK_BYTES])


class PredictionService(_Door, rpc.PredictionServiceServicer):
    @mapped_errors
    async def Predict(self, request, context):
        tenant = self.tenant(context)
        work = self.runtime.predictor.predict(tenant, list(request.images), list(request.heads),
                                              top_k=request.top_k or 5, embedding=request.include_embedding, door="grpc")
        remaining = context.time_remaining()
        try:
            predictions = await (asyncio.wait_for(work, remaining) if remaining is not None else work)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the prediction was ready")
        return api.PredictResponse(predictions=[convert.image_prediction(p) for p in predictions])

    async def StreamPredict(self, request_iterator, context):
        """Each request is predicted concurrently; a failed image answers with its error, the stream goes on.

        One stream has at most ``max_images_per_request`` requests between being read and being answered
        (as many as one Predict call): past that it stops reading, so a client that sends faster than the
        engine predicts is slowed by flow control instead of queueing unbounded work.
        """
        try:
            tenant = self.tenant(context)
        except Exception as exc:
            await context.abort(*status_of(exc))
        responses: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self.core.settings.max_images_per_request)

        async def answer(message) -> None:
            try:
                [prediction] = await self.runtime.predictor.predict(
                    tenant, [message.image], list(message.heads), top_k=message.top_k or 5,
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

        reader = asyncio.create_task(read_all())
        try:
            while (response := await responses.get()) is not None:
                yield response
                window.release()
        finally:
            reader.cancel()  # a no-op once every request was answered; else the client left: drop its work
        await reader  # surfaces a broken request stream


SERVICES = (BackboneService, DatasetService, JobService, HeadService, PredictionService)
