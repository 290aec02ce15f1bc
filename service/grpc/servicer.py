"""graft.v1 services: each method decodes its request, makes one call of service/calls.py, encodes the result.

Authentication and error mapping wrap every method once (``door_method``); the
calls run store work off the event loop (it also runs the batcher). No behaviour
lives here that HTTP lacks; errors map to status codes in service/grpc/errors.py.
"""

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import empty_pb2

from service.calls import Calls, InflightBytes, while_key_valid
from service.errors import DeadlineExceeded, InvalidArgument
from service.grpc import convert
from service.grpc.errors import mapped_errors, status_of
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.resources import Dataset, ExampleLabel
from service.runtime import Runtime
from service.store.datasets import IdentifiedExample, UploadBudget

EXPORT_CHUNK_BYTES = 1 << 20
UPLOAD_QUEUE_IMAGES = 4  # images one CreateDataset stream holds between reading and validating them
_END = object()


class _Door:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.core = runtime.core


def door_method(method: Callable) -> Callable:
    """A servicer method ``(self, request, context, calls)``: the caller authenticated first, errors mapped."""

    async def calls(self: _Door, context: grpc.aio.ServicerContext) -> Calls:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        return await Calls.authenticate(self.runtime, authorization)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self, request, context):
            async for item in method(self, request, context, await calls(self, context)):
                yield item

        return mapped_errors(streaming)

    @functools.wraps(method)
    async def unary(self, request, context):
        return await method(self, request, context, await calls(self, context))

    return mapped_errors(unary)


class BackboneService(_Door, rpc.BackboneServiceServicer):
    @door_method
    async def GetBackbone(self, request, context, calls: Calls):
        return convert.message(calls.get_backbone(request.name), pb.Backbone)

    @door_method
    async def ListBackbones(self, request, context, calls: Calls):
        return convert.message(calls.list_backbones(), api.ListBackbonesResponse)


class DatasetService(_Door, rpc.DatasetServiceServicer):
    @door_method
    async def CreateDataset(self, request_iterator, context, calls: Calls):
        """The store validates images as they arrive, one at a time, so a stream never holds the whole upload."""
        limit = self.core.settings.upload_timeout_s
        try:
            async with asyncio.timeout(limit):
                return convert.message(await self._create(calls, request_iterator, _request_id(context)), pb.Dataset)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the upload did not finish within {limit:g} s (GRAFT_UPLOAD_TIMEOUT_S); "
                "send smaller datasets or a faster stream"
            ) from None

    async def _create(
        self, calls: Calls, request_iterator: AsyncIterator[api.CreateDatasetRequest], request_id: str | None
    ) -> Dataset:
        """Messages are read (and checked against the limits) as they arrive, up to ``UPLOAD_QUEUE_IMAGES`` ahead
        of the store, which validates and stores them one at a time, each in an upload thread taken for that
        image only: no thread waits for the client's next message, so idle streams hold nothing but their bytes."""
        first = await anext(request_iterator, None)
        if first is None:
            raise InvalidArgument("the stream was empty: send a header, then the images")
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message must carry the header (display_name)")
        display_name = first.header.display_name
        # A repeat of an upload that already made its dataset answers that one; the rest of its stream is unread.
        return await calls.dataset_once(
            display_name, request_id, lambda: self._receive(calls, display_name, request_iterator)
        )

    async def _receive(
        self, calls: Calls, display_name: str, request_iterator: AsyncIterator[api.CreateDatasetRequest]
    ) -> Dataset:
        upload = await calls.begin_upload(display_name)
        inflight = self.runtime.uploads
        queue: asyncio.Queue = asyncio.Queue(UPLOAD_QUEUE_IMAGES)

        async def store_all() -> Dataset:
            while (item := await queue.get()) is not _END:
                try:
                    await upload.add(*item)
                finally:
                    inflight.give_back(len(item[1]))
            return await upload.commit()

        store = asyncio.ensure_future(store_all())
        try:
            budget = UploadBudget(self.core.settings)
            count = 0
            async for message in request_iterator:
                example = _example(message, count)
                budget.take(example[0], len(example[1]))
                inflight.take(len(example[1]))
                if not await _put_unless_done(queue, example, store):
                    inflight.give_back(len(example[1]))
                    break  # the store refused an image: its error is the answer
                count += 1
            else:
                await _put_unless_done(queue, _END, store)
            return await store
        finally:
            if not store.done():
                store.cancel()
                await asyncio.gather(store, return_exceptions=True)
            _drain(queue, inflight)
            if not (store.done() and not store.cancelled() and store.exception() is None):
                await upload.abandon()

    @door_method
    async def GetDataset(self, request, context, calls: Calls):
        return convert.message(await calls.get_dataset(request.name), pb.Dataset)

    @door_method
    async def ListDatasets(self, request, context, calls: Calls):
        return convert.message(
            await calls.list_datasets(request.page_size, request.page_token), api.ListDatasetsResponse
        )

    @door_method
    async def ListExamples(self, request, context, calls: Calls):
        response = await calls.list_examples(request.parent, request.page_size, request.page_token)
        return convert.message(response, api.ListExamplesResponse)

    @door_method
    async def GetExample(self, request, context, calls: Calls):
        dataset, example = _example_name(request.name)
        return convert.message(await calls.get_example(dataset, example), pb.Example)

    @door_method
    async def GetExampleImage(self, request, context, calls: Calls):
        dataset, example = _example_name(request.name)
        content_type, data = await calls.get_example_image(dataset, example)
        return api.ExampleImage(content_type=content_type, data=data)

    @door_method
    async def UpdateExample(self, request, context, calls: Calls):
        dataset, example = _example_name(request.example.name)
        mask = ",".join(request.update_mask.paths)
        return convert.message(await calls.update_example(dataset, example, request.example.label, mask), pb.Example)

    @door_method
    async def BatchUpdateExamples(self, request, context, calls: Calls):
        updates = [
            ExampleLabel.model_construct(example=u.example, label=u.label) for u in request.updates
        ]  # the store checks them
        response = await calls.batch_update_examples(request.parent, updates)
        return convert.message(response, api.BatchUpdateExamplesResponse)

    @door_method
    async def ImportLabels(self, request, context, calls: Calls):
        return convert.message(await calls.import_labels(request.parent, request.csv), api.ImportLabelsResponse)

    @door_method
    async def DeleteDataset(self, request, context, calls: Calls):
        await calls.delete_dataset(request.name)
        return empty_pb2.Empty()

    @door_method
    async def AuditDataset(self, request, context, calls: Calls):
        similarity = request.duplicate_similarity if request.HasField("duplicate_similarity") else None
        audit = await calls.audit_dataset(  # a client's cancel cancels this task, which stops the audit
            request.name, request.backbone, request.max_suspects, request.max_duplicates, similarity
        )
        return convert.message(audit, pb.DatasetAudit)

    @door_method
    async def SuggestExamples(self, request, context, calls: Calls):
        strategy = convert.suggestion_strategy(request.strategy)
        found = await calls.suggest_examples(  # a client's cancel cancels this task, which stops the ranking
            request.name, request.head, request.count, strategy, request.seed
        )
        return convert.message(found, api.SuggestExamplesResponse)


def _example_name(name: str) -> tuple[str, str]:
    """'datasets/{dataset}/examples/{example}' -> (dataset, example)."""
    dataset, separator, example = name.rpartition("/examples/")
    if not separator or not example:
        raise InvalidArgument(
            f"{name[:300]!r} is not an example name of the form 'datasets/{{dataset}}/examples/{{example}}'"
        )
    return dataset, example


def _request_id(context: grpc.aio.ServicerContext) -> str | None:
    """The ``idempotency-key`` metadata of a creating call (HTTP's ``Idempotency-Key`` header), if sent."""
    return dict(context.invocation_metadata() or ()).get("idempotency-key") or None


def _example(message: api.CreateDatasetRequest, index: int) -> IdentifiedExample:
    part = message.WhichOneof("part")
    if part == "header":
        raise InvalidArgument("send the header once, as the first message")
    if part != "image":
        raise InvalidArgument("each message must carry a header or an image")
    image = message.image
    return image.file_name or f"image {index}", image.data, image.label, image.client_id or None


async def _put_unless_done(queue: asyncio.Queue, item: object, store: asyncio.Future) -> bool:
    """Queue ``item`` for the store; False if the store ended first (it refused the upload)."""
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, store}, return_when=asyncio.FIRST_COMPLETED)
    if put.done():
        return True
    put.cancel()
    return False


def _drain(queue: asyncio.Queue, inflight: InflightBytes) -> None:
    """Give back the bytes of the images the store will not read."""
    while not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, tuple):
            inflight.give_back(len(item[1]))


class JobService(_Door, rpc.JobServiceServicer):
    @door_method
    async def CreateJob(self, request, context, calls: Calls):
        spec = convert.training_spec(request.spec)
        return convert.message(await calls.create_job(spec, _request_id(context)), pb.Job)

    @door_method
    async def GetJob(self, request, context, calls: Calls):
        return convert.message(await calls.get_job(request.name), pb.Job)

    @door_method
    async def ListJobs(self, request, context, calls: Calls):
        return convert.message(await calls.list_jobs(request.page_size, request.page_token), api.ListJobsResponse)

    @door_method
    async def CancelJob(self, request, context, calls: Calls):
        return convert.message(await calls.cancel_job(request.name), pb.Job)

    @door_method
    async def WatchJob(self, request, context, calls: Calls):
        async for job in await calls.watch_job(request.name):
            yield convert.message(job, pb.Job)


class BatchPredictionService(_Door, rpc.BatchPredictionServiceServicer):
    @door_method
    async def CreateBatchPrediction(self, request, context, calls: Calls):
        spec = convert.batch_prediction_spec(request.spec)
        return convert.message(await calls.create_batch_prediction(spec, _request_id(context)), pb.BatchPrediction)

    @door_method
    async def GetBatchPrediction(self, request, context, calls: Calls):
        return convert.message(await calls.get_batch_prediction(request.name), pb.BatchPrediction)

    @door_method
    async def ListBatchPredictions(self, request, context, calls: Calls):
        found = await calls.list_batch_predictions(request.page_size, request.page_token)
        return convert.message(found, api.ListBatchPredictionsResponse)

    @door_method
    async def CancelBatchPrediction(self, request, context, calls: Calls):
        return convert.message(await calls.cancel_batch_prediction(request.name), pb.BatchPrediction)

    @door_method
    async def DeleteBatchPrediction(self, request, context, calls: Calls):
        await calls.delete_batch_prediction(request.name)
        return empty_pb2.Empty()

    @door_method
    async def GetBatchPredictionResults(self, request, context, calls: Calls):
        format = convert.results_format(request.format)
        async for piece in await calls.batch_prediction_results(request.name, format):
            yield api.BatchPredictionResultsChunk(chunk=piece)


class HeadService(_Door, rpc.HeadServiceServicer):
    @door_method
    async def GetHead(self, request, context, calls: Calls):
        return convert.message(await calls.get_head(request.name), pb.Head)

    @door_method
    async def GetHeadVersion(self, request, context, calls: Calls):
        return convert.message(await calls.get_head_version(request.name), pb.HeadVersion)

    @door_method
    async def ListHeads(self, request, context, calls: Calls):
        return convert.message(await calls.list_heads(request.page_size, request.page_token), api.ListHeadsResponse)

    @door_method
    async def DeleteHead(self, request, context, calls: Calls):
        await calls.delete_head(request.name)
        return empty_pb2.Empty()

    @door_method
    async def DeleteHeadVersion(self, request, context, calls: Calls):
        await calls.delete_head_version(request.name)
        return empty_pb2.Empty()

    @door_method
    async def SetAlias(self, request, context, calls: Calls):
        return convert.message(await calls.set_alias(request.name, request.alias, request.version), pb.Head)

    @door_method
    async def RemoveAlias(self, request, context, calls: Calls):
        await calls.remove_alias(request.name, request.alias)
        return empty_pb2.Empty()

    @door_method
    async def SetHeadShadow(self, request, context, calls: Calls):
        return convert.message(await calls.set_shadow(request.name, request.version), pb.Head)

    @door_method
    async def ClearHeadShadow(self, request, context, calls: Calls):
        return convert.message(await calls.clear_shadow(request.name), pb.Head)

    @door_method
    async def CompareHeadVersions(self, request, context, calls: Calls):
        return convert.comparisons(await calls.compare_head_versions(request.name))

    @door_method
    async def GetHeadMonitoring(self, request, context, calls: Calls):
        return convert.message(await calls.head_monitoring(request.name), api.HeadMonitoring)

    @door_method
    async def ClearHeadDrift(self, request, context, calls: Calls):
        return convert.message(await calls.clear_head_drift(request.name), api.HeadMonitoring)

    @door_method
    async def ExportHead(self, request, context, calls: Calls):
        format = convert.export_format(request.format)
        exported = await calls.export_head(request.head, format, list(request.additional_heads))
        for start in range(0, len(exported.data), EXPORT_CHUNK_BYTES):
            yield api.ExportHeadResponse(chunk=exported.data[start : start + EXPORT_CHUNK_BYTES])


class PredictionService(_Door, rpc.PredictionServiceServicer):
    @door_method
    async def ReportPredictionFeedback(self, request, context, calls: Calls):
        return convert.message(await calls.report_feedback(request.name, request.label), api.PredictionFeedback)

    @door_method
    async def Predict(self, request, context, calls: Calls):
        options = convert.predict_options(request)
        work = calls.predict(list(request.images), list(request.heads), options, door="grpc")
        remaining = context.time_remaining()
        try:
            predictions = await (asyncio.wait_for(work, remaining) if remaining is not None else work)
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed before the prediction was ready") from None
        return api.PredictResponse(predictions=[convert.image_prediction(p) for p in predictions])

    @door_method
    async def StreamPredict(self, request_iterator, context, calls: Calls):
        """Each request is predicted concurrently; a failed image answers with its error, the stream goes on.

        One stream has at most ``max_images_per_request`` requests between being read and being answered
        (as many as one Predict call): past that it stops reading, so a client that sends faster than the
        engine predicts is slowed by flow control instead of queueing unbounded work. The key is checked
        again every ``key_recheck_s``: revoking it ends the stream with UNAUTHENTICATED.
        """
        calls.check_predicting()
        responses: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self.core.settings.max_images_per_request)

        async def answer(message) -> None:
            try:
                options = convert.predict_options(message)
                [prediction] = await calls.predict([message.image], list(message.heads), options, door="grpc")
                response = api.StreamPredictResponse(
                    request_id=message.request_id, prediction=convert.image_prediction(prediction)
                )
            except Exception as exc:
                code, text = status_of(exc)
                response = api.StreamPredictResponse(
                    request_id=message.request_id, error_code=code.value[0], error_message=text
                )
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
            async for response in while_key_valid(answers(), calls.key):
                yield response
                window.release()
        finally:
            reader.cancel()  # a no-op once every request was answered; else the client left: drop its work
            await asyncio.gather(reader, return_exceptions=True)
        await reader  # surfaces a broken request stream


class WebhookService(_Door, rpc.WebhookServiceServicer):
    @door_method
    async def CreateWebhook(self, request, context, calls: Calls):
        return convert.message(await calls.create_webhook(convert.create_webhook_request(request)), pb.Webhook)

    @door_method
    async def GetWebhook(self, request, context, calls: Calls):
        return convert.message(await calls.get_webhook(request.name), pb.Webhook)

    @door_method
    async def ListWebhooks(self, request, context, calls: Calls):
        found = await calls.list_webhooks(request.page_size, request.page_token)
        return convert.message(found, api.ListWebhooksResponse)

    @door_method
    async def DeleteWebhook(self, request, context, calls: Calls):
        await calls.delete_webhook(request.name)
        return empty_pb2.Empty()

    @door_method
    async def ListWebhookDeliveries(self, request, context, calls: Calls):
        found = await calls.list_webhook_deliveries(request.parent, request.page_size, request.page_token)
        return convert.message(found, api.ListWebhookDeliveriesResponse)

    @door_method
    async def TestWebhook(self, request, context, calls: Calls):
        return convert.message(await calls.test_webhook(request.name), pb.WebhookDelivery)


SERVICES = (
    BackboneService,
    DatasetService,
    JobService,
    BatchPredictionService,
    HeadService,
    PredictionService,
    WebhookService,
)
