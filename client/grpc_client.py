"""The client over the gRPC door (``graft.v1``), with its own stubs in client/_proto.

Messages are turned into the same JSON the HTTP door sends (proto field names,
enum values lowercase without their prefix), so both transports return the same
models. Uploads are a client stream of one image per message.
"""

import functools
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from client._proto.graft.v1 import resources_pb2 as pb
from client._proto.graft.v1 import service_pb2 as api
from client._proto.graft.v1 import service_pb2_grpc as rpc
from client.base import AUDIT_TIMEOUT_S, IDEMPOTENCY_METADATA, Client, PredictOptions, UploadProgress, new_request_id
from client.errors import DeadlineExceeded, GraftError, Unavailable, error_for
from client.models import (
    Backbone,
    BatchPrediction,
    BatchPredictionSpec,
    Dataset,
    DatasetAudit,
    DatasetExample,
    Head,
    HeadComparisons,
    HeadMonitoring,
    HeadVersion,
    ImagePrediction,
    Job,
    LabelImport,
    PredictionFeedback,
    Suggestions,
    TrainingSpec,
    Webhook,
    WebhookDelivery,
)
from client.retry import DEFAULT_RETRY, RetryPolicy
from client.sources import Example, from_directory

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's default GRAFT_GRPC_MAX_MESSAGE_BYTES
PAGE_SIZE = 1000
# The enumerated fields and their values' proto prefix: QUEUED -> queued, HEAD_KIND_LINEAR -> linear, as over HTTP.
_ENUM_FIELDS = {
    "state": "",
    "kind": "HEAD_KIND_",
    "objective": "OBJECTIVE_",
    "class_weighting": "CLASS_WEIGHTING_",
    "scaling": "FEATURE_SCALING_",
    "status": "DRIFT_STATUS_",
    "strategy": "SUGGESTION_STRATEGY_",
}
_SPEC_ENUM_FIELDS = ("kind", "objective", "class_weighting", "scaling")  # TrainingSpec's
# proto3 "" is HTTP's null for these fields
_UNSET_WHEN_EMPTY = {
    "head_version",
    "error",
    "job",
    "backbone",
    "prediction_id",
    "file_name",
    "client_id",
    "secret",
    "last_error",
    "label",
}


class GrpcClient(Client):
    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        *,
        tls: bool = False,
        ca_file: str | None = None,
    ) -> None:
        """``tls``: the port speaks TLS (``grpcs://``); the certificate is checked against the system's roots, or
        against ``ca_file`` (PEM) only. Without TLS the API key travels in clear: use it on a private network."""
        super().__init__(f"{'grpcs' if tls else 'grpc'}://{target}", api_key, timeout_s, retry)
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self._tls = tls
        if tls:
            roots = Path(ca_file).expanduser().read_bytes() if ca_file else None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        elif ca_file:
            raise ValueError(f"a CA file ({ca_file}) is for TLS: use grpcs://{target}")
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._backbones = rpc.BackboneServiceStub(self._channel)
        self._datasets = rpc.DatasetServiceStub(self._channel)
        self._jobs = rpc.JobServiceStub(self._channel)
        self._batches = rpc.BatchPredictionServiceStub(self._channel)
        self._heads = rpc.HeadServiceStub(self._channel)
        self._predictions = rpc.PredictionServiceStub(self._channel)
        self._webhooks = rpc.WebhookServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    # One call, errors translated ----------------------------------------------------------------------------------

    def _invoke(self, method: Any, request: Any, timeout_s: float | None = -1.0, request_id: str | None = None) -> Any:
        """One call (no retry): its answer, or its status as a GraftError."""
        metadata = self._metadata + (((IDEMPOTENCY_METADATA, request_id),) if request_id else ())
        try:
            return method(request, metadata=metadata, timeout=self.timeout_s if timeout_s == -1.0 else timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _call(self, method: Any, request: Any, *, safe: bool = True, request_id: str | None = None) -> Any:
        """A unary call, retried on UNAVAILABLE or RESOURCE_EXHAUSTED with a retry-after. An UNAVAILABLE that may
        have come after the call ran is retried only when the call is ``safe`` (a read) or carries ``request_id``."""
        return self.retry.call(
            lambda: self._invoke(method, request, request_id=request_id), safe=safe or request_id is not None
        )

    def _error(self, exc: grpc.RpcError) -> GraftError:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        message: str = exc.details() or code.name  # type: ignore[attr-defined]
        trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        retry_after = trailers.get("retry-after")
        if code == grpc.StatusCode.UNAVAILABLE and _never_connected(message):
            return Unavailable(
                f"cannot reach graft at {self.url} ({message}): {self._connect_hint(message)}", may_have_run=False
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and message == "Deadline Exceeded":
            return DeadlineExceeded(
                f"no answer from {self.url} within {self.timeout_s:g} s; raise the timeout (--timeout) or try again"
            )
        return error_for(code.name, message, retry_after_s=float(retry_after) if retry_after else None)

    def _connect_hint(self, message: str) -> str:
        text = message.lower()
        if self._tls and any(words in text for words in ("ssl", "tls", "handshake", "certificate")):
            return (
                "the TLS handshake failed: does the port speak TLS (else use grpc://), and is its certificate "
                "signed by a CA this client trusts (--ca-file / GRAFT_CA_FILE for a private or "
                "self-signed one)?"
            )
        if not self._tls and "socket closed" in text:
            return "the server closed the connection at once: if its port speaks TLS, use grpcs://HOST:PORT"
        return "is the server running and the target right (--url or GRAFT_URL)?"

    def _pages(self, method: Any, request_type: Callable[..., Message], key: str) -> list[Message]:
        items: list[Message] = []
        token = ""
        while True:
            page = self._call(method, request_type(page_size=PAGE_SIZE, page_token=token))
            items += getattr(page, key)
            token = page.next_page_token
            if not token:
                return items

    # Datasets -----------------------------------------------------------------------------------------------------

    def _upload_examples(
        self, display_name: str, examples: Iterable[Example], progress: UploadProgress | None, request_id: str
    ) -> Dataset:
        def messages() -> Iterator[api.CreateDatasetRequest]:
            yield api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name=display_name))
            sent = 0
            for count, example in enumerate(examples, start=1):
                data = example.read()
                yield api.CreateDatasetRequest(
                    image=api.CreateDatasetRequest.Image(file_name=example.file_name, label=example.label, data=data)
                )
                sent += len(data)
                if progress is not None:
                    progress(sent, count)

        answer = self._invoke(self._datasets.CreateDataset, messages(), timeout_s=None, request_id=request_id)
        return Dataset.model_validate(_json(answer))

    def _upload_zip(self, display_name: str, path: Path, progress: UploadProgress | None, request_id: str) -> Dataset:
        """gRPC streams images, not archives: the zip is unpacked to a temporary folder, then sent one by one."""
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                target = (Path(tmp) / info.filename).resolve()
                if not target.is_relative_to(Path(tmp).resolve()):
                    raise ValueError(f"{path}: entry {info.filename!r} points outside the archive")
            archive.extractall(tmp)
            return self._upload_examples(display_name, from_directory(Path(tmp)), progress, request_id)

    def get_dataset(self, name: str) -> Dataset:
        return Dataset.model_validate(
            _json(self._call(self._datasets.GetDataset, api.GetDatasetRequest(name=_named(name, "datasets"))))
        )

    def list_datasets(self) -> list[Dataset]:
        pages = self._pages(self._datasets.ListDatasets, api.ListDatasetsRequest, "datasets")
        return [Dataset.model_validate(_json(d)) for d in pages]

    def list_examples(self, dataset: str) -> list[DatasetExample]:
        request = functools.partial(api.ListExamplesRequest, parent=_named(dataset, "datasets"))
        pages = self._pages(self._datasets.ListExamples, request, "examples")
        return [DatasetExample.model_validate(_json(e)) for e in pages]

    def label_example(self, dataset: str, example: str, label: str | None) -> DatasetExample:
        name = f"{_named(dataset, 'datasets')}/examples/{example}"
        request = api.UpdateExampleRequest(example=pb.Example(name=name, label=label or ""))
        return DatasetExample.model_validate(_json(self._call(self._datasets.UpdateExample, request)))

    def label_examples(self, dataset: str, labels: Mapping[str, str | None]) -> list[DatasetExample]:
        updates = [api.ExampleLabel(example=example, label=label or "") for example, label in labels.items()]
        request = api.BatchUpdateExamplesRequest(parent=_named(dataset, "datasets"), updates=updates)
        answer = self._call(self._datasets.BatchUpdateExamples, request)
        return [DatasetExample.model_validate(_json(e)) for e in answer.examples]

    def import_labels(self, dataset: str, rows: bytes) -> LabelImport:
        request = api.ImportLabelsRequest(parent=_named(dataset, "datasets"), csv=rows)
        return LabelImport.model_validate(_json(self._call(self._datasets.ImportLabels, request)))

    def delete_dataset(self, name: str) -> None:
        self._call(self._datasets.DeleteDataset, api.DeleteDatasetRequest(name=_named(name, "datasets")), safe=False)

    def audit_dataset(
        self,
        name: str,
        *,
        backbone: str | None = None,
        max_suspects: int = 0,
        max_duplicates: int = 0,
        duplicate_similarity: float | None = None,
    ) -> DatasetAudit:
        request = api.AuditDatasetRequest(
            name=_named(name, "datasets"),
            backbone=backbone or "",
            max_suspects=max_suspects,
            max_duplicates=max_duplicates,
        )
        if duplicate_similarity is not None:
            request.duplicate_similarity = duplicate_similarity
        timeout_s = max(self.timeout_s, AUDIT_TIMEOUT_S)
        answer = self.retry.call(lambda: self._invoke(self._datasets.AuditDataset, request, timeout_s=timeout_s))
        return DatasetAudit.model_validate(_json(answer))

    def suggest_examples(
        self, dataset: str, head: str, *, count: int = 0, strategy: str | None = None, seed: int = 0
    ) -> Suggestions:
        request = api.SuggestExamplesRequest(name=_named(dataset, "datasets"), head=head, count=count, seed=seed)
        if strategy is not None:
            request.strategy = api.SuggestionStrategy.Value(f"{_ENUM_FIELDS['strategy']}{strategy.upper()}")
        timeout_s = max(self.timeout_s, AUDIT_TIMEOUT_S)
        answer = self.retry.call(lambda: self._invoke(self._datasets.SuggestExamples, request, timeout_s=timeout_s))
        return Suggestions.model_validate(_json(answer))

    # Jobs ---------------------------------------------------------------------------------------------------------

    def create_job(self, spec: TrainingSpec, request_id: str | None = None) -> Job:
        fields = spec.model_dump(mode="json", exclude_none=True)
        for field in _SPEC_ENUM_FIELDS:
            if field in fields:
                fields[field] = f"{_ENUM_FIELDS[field]}{fields[field].upper()}"
        request = api.CreateJobRequest(spec=json_format.ParseDict(fields, pb.TrainingSpec()))
        answer = self._call(self._jobs.CreateJob, request, request_id=request_id or new_request_id())
        return Job.model_validate(_json(answer))

    def get_job(self, name: str) -> Job:
        return Job.model_validate(_json(self._call(self._jobs.GetJob, api.GetJobRequest(name=_named(name, "jobs")))))

    def list_jobs(self) -> list[Job]:
        return [Job.model_validate(_json(j)) for j in self._pages(self._jobs.ListJobs, api.ListJobsRequest, "jobs")]

    def cancel_job(self, name: str) -> Job:
        request = api.CancelJobRequest(name=_named(name, "jobs"))
        return Job.model_validate(_json(self._call(self._jobs.CancelJob, request, safe=False)))

    def _watch_once(self, name: str) -> Iterator[Job]:
        stream = self._invoke(self._jobs.WatchJob, api.WatchJobRequest(name=_named(name, "jobs")), timeout_s=None)
        try:
            for update in stream:
                yield Job.model_validate(_json(update))
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            stream.cancel()

    # Batch predictions --------------------------------------------------------------------------------------------

    def create_batch_prediction(self, spec: BatchPredictionSpec, request_id: str | None = None) -> BatchPrediction:
        request = api.CreateBatchPredictionRequest(spec=pb.BatchPredictionSpec(**spec.model_dump()))
        answer = self._call(self._batches.CreateBatchPrediction, request, request_id=request_id or new_request_id())
        return BatchPrediction.model_validate(_json(answer))

    def get_batch_prediction(self, name: str) -> BatchPrediction:
        request = api.GetBatchPredictionRequest(name=_named(name, "batchPredictions"))
        return BatchPrediction.model_validate(_json(self._call(self._batches.GetBatchPrediction, request)))

    def list_batch_predictions(self) -> list[BatchPrediction]:
        pages = self._pages(self._batches.ListBatchPredictions, api.ListBatchPredictionsRequest, "batch_predictions")
        return [BatchPrediction.model_validate(_json(b)) for b in pages]

    def cancel_batch_prediction(self, name: str) -> BatchPrediction:
        request = api.CancelBatchPredictionRequest(name=_named(name, "batchPredictions"))
        return BatchPrediction.model_validate(
            _json(self._call(self._batches.CancelBatchPrediction, request, safe=False))
        )

    def delete_batch_prediction(self, name: str) -> None:
        request = api.DeleteBatchPredictionRequest(name=_named(name, "batchPredictions"))
        self._call(self._batches.DeleteBatchPrediction, request, safe=False)

    def batch_prediction_results(self, name: str, format: str = "jsonl") -> bytes:
        request = api.GetBatchPredictionResultsRequest(
            name=_named(name, "batchPredictions"),
            format=api.BatchResultsFormat.Value(f"BATCH_RESULTS_FORMAT_{format.upper()}"),
        )

        def download() -> bytes:
            try:
                return b"".join(part.chunk for part in self._invoke(self._batches.GetBatchPredictionResults, request))
            except grpc.RpcError as exc:
                raise self._error(exc) from None

        return self.retry.call(download)

    # Heads --------------------------------------------------------------------------------------------------------

    def list_heads(self) -> list[Head]:
        return [
            Head.model_validate(_json(h)) for h in self._pages(self._heads.ListHeads, api.ListHeadsRequest, "heads")
        ]

    def get_head(self, name: str) -> Head:
        return Head.model_validate(
            _json(self._call(self._heads.GetHead, api.GetHeadRequest(name=_named(name, "heads"))))
        )

    def get_head_version(self, name: str, version: int) -> HeadVersion:
        request = api.GetHeadVersionRequest(name=f"{_named(name, 'heads')}/versions/{version}")
        return HeadVersion.model_validate(_json(self._call(self._heads.GetHeadVersion, request)))

    def delete_head(self, name: str) -> None:
        self._call(self._heads.DeleteHead, api.DeleteHeadRequest(name=_named(name, "heads")), safe=False)

    def delete_head_version(self, name: str, version: int) -> None:
        request = api.DeleteHeadVersionRequest(name=f"{_named(name, 'heads')}/versions/{version}")
        self._call(self._heads.DeleteHeadVersion, request, safe=False)

    def set_alias(self, head: str, alias: str, version: int) -> Head:
        request = api.SetAliasRequest(name=_named(head, "heads"), alias=alias, version=version)
        return Head.model_validate(_json(self._call(self._heads.SetAlias, request)))

    def remove_alias(self, head: str, alias: str) -> None:
        request = api.RemoveAliasRequest(name=_named(head, "heads"), alias=alias)
        self._call(self._heads.RemoveAlias, request, safe=False)

    def export(self, head: str, format: str = "safetensors", additional_heads: Sequence[str] = ()) -> bytes:
        request = api.ExportHeadRequest(
            head=head,
            format=api.ExportFormat.Value(f"EXPORT_FORMAT_{format.upper()}"),
            additional_heads=list(additional_heads),
        )

        def download() -> bytes:
            try:
                return b"".join(part.chunk for part in self._invoke(self._heads.ExportHead, request))
            except grpc.RpcError as exc:
                raise self._error(exc) from None

        return self.retry.call(download)

    # Shadow versions, feedback and monitoring ---------------------------------------------------------------------

    def set_shadow(self, head: str, version: int) -> Head:
        request = api.SetHeadShadowRequest(name=_named(head, "heads"), version=version)
        return Head.model_validate(_json(self._call(self._heads.SetHeadShadow, request)))

    def clear_shadow(self, head: str) -> Head:
        request = api.ClearHeadShadowRequest(name=_named(head, "heads"))
        return Head.model_validate(_json(self._call(self._heads.ClearHeadShadow, request)))

    def compare(self, head: str) -> HeadComparisons:
        reply = self._call(self._heads.CompareHeadVersions, api.CompareHeadVersionsRequest(name=_named(head, "heads")))
        answer = _json(reply)
        for comparison in answer["comparisons"]:  # proto rows of counts: the HTTP door's list of lists
            comparison["confusion"] = [row["counts"] for row in comparison["confusion"]]
        return HeadComparisons.model_validate(answer)

    def report_feedback(self, prediction_id: str, label: str) -> PredictionFeedback:
        # Not retried once it may have run: a second try would answer ALREADY_EXISTS, as if reported twice.
        request = api.ReportPredictionFeedbackRequest(name=_named(prediction_id, "predictions"), label=label)
        return PredictionFeedback.model_validate(
            _json(self._call(self._predictions.ReportPredictionFeedback, request, safe=False))
        )

    def monitor(self, head: str, version: int | None = None) -> HeadMonitoring:
        name = _named(head, "heads") + ("" if version is None else f"/versions/{version}")
        reply = self._call(self._heads.GetHeadMonitoring, api.GetHeadMonitoringRequest(name=name))
        return HeadMonitoring.model_validate(_json(reply))

    def clear_drift(self, head: str, version: int) -> HeadMonitoring:
        request = api.ClearHeadDriftRequest(name=f"{_named(head, 'heads')}/versions/{version}")
        return HeadMonitoring.model_validate(_json(self._call(self._heads.ClearHeadDrift, request)))

    # Prediction and backbones -------------------------------------------------------------------------------------

    def _predict(self, images: list[bytes], heads: list[str], options: PredictOptions) -> list[ImagePrediction]:
        request = api.PredictRequest(images=images, heads=heads, **options.model_dump(exclude_none=True))
        reply = self._invoke(self._predictions.Predict, request)
        # proto3 has no null: an embedding or a set not asked for is an empty list, None over HTTP.
        predictions = [ImagePrediction.model_validate(_json(p)) for p in reply.predictions]
        for prediction in predictions:
            prediction.embedding = prediction.embedding if options.include_embedding else None
            for head in prediction.heads:
                for answer in (head, head.shadow) if head.shadow else (head,):
                    answer.prediction_set = (answer.prediction_set or []) if options.coverage else None
        return predictions

    def create_webhook(self, url: str, event_types: Sequence[str], description: str = "") -> Webhook:
        request = api.CreateWebhookRequest(url=url, event_types=list(event_types), description=description)
        return Webhook.model_validate(_json(self._call(self._webhooks.CreateWebhook, request, safe=False)))

    def get_webhook(self, name: str) -> Webhook:
        request = api.GetWebhookRequest(name=_named(name, "webhooks"))
        return Webhook.model_validate(_json(self._call(self._webhooks.GetWebhook, request)))

    def list_webhooks(self) -> list[Webhook]:
        pages = self._pages(self._webhooks.ListWebhooks, api.ListWebhooksRequest, "webhooks")
        return [Webhook.model_validate(_json(w)) for w in pages]

    def delete_webhook(self, name: str) -> None:
        request = api.DeleteWebhookRequest(name=_named(name, "webhooks"))
        self._call(self._webhooks.DeleteWebhook, request, safe=False)

    def list_webhook_deliveries(self, name: str) -> list[WebhookDelivery]:
        items: list[WebhookDelivery] = []
        token = ""
        while True:
            request = api.ListWebhookDeliveriesRequest(
                parent=_named(name, "webhooks"), page_size=PAGE_SIZE, page_token=token
            )
            page = self._call(self._webhooks.ListWebhookDeliveries, request)
            items += [_delivery(d) for d in page.deliveries]
            token = page.next_page_token
            if not token:
                return items

    def test_webhook(self, name: str) -> WebhookDelivery:
        request = api.TestWebhookRequest(name=_named(name, "webhooks"))
        return _delivery(self._call(self._webhooks.TestWebhook, request, safe=False))

    def list_backbones(self) -> list[Backbone]:
        reply = self._call(self._backbones.ListBackbones, api.ListBackbonesRequest())
        return [Backbone.model_validate(_json(b)) for b in reply.backbones]


def _never_connected(message: str) -> bool:
    """An UNAVAILABLE from failing to connect (nothing was sent), not from a connection that broke mid-call."""
    text = message.lower()
    return text == "unavailable" or any(
        words in text for words in ("failed to connect", "connection refused", "dns resolution", "connect failed")
    )


def _named(name: str, collection: str) -> str:
    return name if name.startswith(f"{collection}/") else f"{collection}/{name}"


def _json(message: Message) -> dict[str, Any]:
    """The message as the HTTP door's JSON: proto field names, enums lowercase, unset strings as None."""
    return _plain(
        json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )


def _plain(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _plain(v, k) for k, v in value.items() if not (v == "" and k in _UNSET_WHEN_EMPTY)}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if key in _ENUM_FIELDS and isinstance(value, str | int):
        return _enum_value(value, _ENUM_FIELDS[key])
    return value


def _enum_value(value: str | int, prefix: str) -> str | None:
    """An enum value as the HTTP door's JSON has it (HEAD_KIND_LINEAR -> linear; unset -> None). A number this
    client's protos do not name, a newer server's value, comes as its digits ('7'): a value, not a crash."""
    if isinstance(value, int):
        return str(value)
    value = value.removeprefix(prefix)
    return None if value.endswith("UNSPECIFIED") else value.lower()


def _delivery(message: Message) -> WebhookDelivery:
    """A delivery as over HTTP: status 0 (proto3's unset) is no answer, None."""
    fields = _json(message)
    fields["last_status_code"] = fields.get("last_status_code") or None
    return WebhookDelivery.model_validate(fields)
