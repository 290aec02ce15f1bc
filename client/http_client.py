"""The client over the HTTP door (``/v1``, JSON; uploads as multipart; job watches as server-sent events)."""

import json
import ssl
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from client.base import AUDIT_TIMEOUT_S, Client, PredictOptions, UploadProgress, new_request_id
from client.errors import DeadlineExceeded, Unavailable, error_for_status
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
    NewKey,
    PredictionFeedback,
    Suggestions,
    Tenant,
    TrainingSpec,
    Webhook,
    WebhookDelivery,
)
from client.multipart import MultipartBody
from client.retry import DEFAULT_RETRY, RetryPolicy
from client.sources import Example, zip_image_count

PAGE_SIZE = 1000


class HttpClient(Client):
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        *,
        ca_file: str | None = None,
    ) -> None:
        """``ca_file``: for https://, trust this PEM CA (a private or self-signed one) instead of the system's."""
        super().__init__(url.rstrip("/"), api_key, timeout_s, retry)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, verify=verify)

    def close(self) -> None:
        self._http.close()

    # One request, errors translated ----------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(
                f"no answer from {self.url} within {self.timeout_s:g} s ({type(exc).__name__}); "
                "raise the timeout (--timeout) or try again"
            ) from None
        except httpx.ConnectError as exc:  # no connection: nothing was sent
            raise Unavailable(
                f"cannot reach graft at {self.url} ({exc or type(exc).__name__}): is the server "
                "running and the URL right (--url or GRAFT_URL)?",
                may_have_run=False,
            ) from None
        except httpx.TransportError as exc:  # the request went out; the server may have run it
            raise Unavailable(
                f"the connection to {self.url} broke ({exc or type(exc).__name__}); the call may have run"
            ) from None
        _raise_for_error(response)
        return response

    def _call(self, method: str, path: str, *, safe: bool | None = None, **kwargs: Any) -> Any:
        """A request with no body stream to replay; the JSON answer or None. Retried when it never ran, and also
        when it may have if it is ``safe`` (default: GET and PUT, and a request with an ``Idempotency-Key``)."""
        if safe is None:
            safe = method in ("GET", "PUT") or "Idempotency-Key" in kwargs.get("headers", {})
        response = self.retry.call(lambda: self._send(method, path, **kwargs), safe=safe)
        return response.json() if response.content else None

    def _pages(self, path: str, key: str) -> list[dict]:
        items, token = [], ""
        while True:
            page = self._call("GET", path, params={"page_size": PAGE_SIZE, "page_token": token})
            items += page[key]
            token = page.get("next_page_token", "")
            if not token:
                return items

    # Datasets -----------------------------------------------------------------------------------------------------

    def _upload_examples(
        self, display_name: str, examples: Iterable[Example], progress: UploadProgress | None, request_id: str
    ) -> Dataset:
        body = MultipartBody([("display_name", display_name)])
        stream, length = body.examples(examples, progress)
        return self._upload(body, stream, length, request_id)

    def _upload_zip(self, display_name: str, path: Path, progress: UploadProgress | None, request_id: str) -> Dataset:
        body = MultipartBody([("display_name", display_name)])
        stream, length = body.archive(path, progress, zip_image_count(path))
        return self._upload(body, stream, length, request_id)

    def _upload(self, body: MultipartBody, stream: Iterator[bytes], length: int | None, request_id: str) -> Dataset:
        headers = {"Content-Type": body.content_type, "Idempotency-Key": request_id}
        headers |= {"Content-Length": str(length)} if length is not None else {}
        # The server validates every image before it answers: reading may take long after the last byte.
        timeout = httpx.Timeout(self.timeout_s, read=max(self.timeout_s, 600.0))
        response = self._send("POST", "/v1/datasets", content=stream, headers=headers, timeout=timeout)
        return Dataset.model_validate(response.json())

    def get_dataset(self, name: str) -> Dataset:
        return Dataset.model_validate(self._call("GET", f"/v1/{_named(name, 'datasets')}"))

    def list_datasets(self) -> list[Dataset]:
        return [Dataset.model_validate(d) for d in self._pages("/v1/datasets", "datasets")]

    def delete_dataset(self, name: str) -> None:
        self._call("DELETE", f"/v1/{_named(name, 'datasets')}")

    def list_examples(self, dataset: str) -> list[DatasetExample]:
        pages = self._pages(f"/v1/{_named(dataset, 'datasets')}/examples", "examples")
        return [DatasetExample.model_validate(e) for e in pages]

    def label_example(self, dataset: str, example: str, label: str | None) -> DatasetExample:
        path = f"/v1/{_named(dataset, 'datasets')}/examples/{example}"
        return DatasetExample.model_validate(self._call("PATCH", path, json={"label": label}, safe=True))

    def label_examples(self, dataset: str, labels: Mapping[str, str | None]) -> list[DatasetExample]:
        body = {"updates": [{"example": example, "label": label} for example, label in labels.items()]}
        answer = self._call("POST", f"/v1/{_named(dataset, 'datasets')}/examples:batchUpdate", json=body, safe=True)
        return [DatasetExample.model_validate(e) for e in answer["examples"]]

    def import_labels(self, dataset: str, rows: bytes) -> LabelImport:
        path = f"/v1/{_named(dataset, 'datasets')}/examples:importLabels"
        answer = self._call("POST", path, content=rows, headers={"Content-Type": "text/csv"}, safe=True)
        return LabelImport.model_validate(answer)

    def audit_dataset(
        self,
        name: str,
        *,
        backbone: str | None = None,
        max_suspects: int = 0,
        max_duplicates: int = 0,
        duplicate_similarity: float | None = None,
    ) -> DatasetAudit:
        params = {
            "backbone": backbone,
            "max_suspects": max_suspects or None,
            "max_duplicates": max_duplicates or None,
            "duplicate_similarity": duplicate_similarity,
        }
        timeout = httpx.Timeout(self.timeout_s, read=max(self.timeout_s, AUDIT_TIMEOUT_S))
        answer = self._call(
            "GET",
            f"/v1/{_named(name, 'datasets')}:audit",
            params={k: v for k, v in params.items() if v is not None},
            timeout=timeout,
        )
        return DatasetAudit.model_validate(answer)

    def suggest_examples(
        self, dataset: str, head: str, *, count: int = 0, strategy: str | None = None, seed: int = 0
    ) -> Suggestions:
        params = {"head": head, "count": count or None, "strategy": strategy, "seed": seed or None}
        timeout = httpx.Timeout(self.timeout_s, read=max(self.timeout_s, AUDIT_TIMEOUT_S))
        answer = self._call(
            "GET",
            f"/v1/{_named(dataset, 'datasets')}:suggest",
            params={k: v for k, v in params.items() if v is not None},
            timeout=timeout,
        )
        return Suggestions.model_validate(answer)

    # Jobs ---------------------------------------------------------------------------------------------------------

    def create_job(self, spec: TrainingSpec, request_id: str | None = None) -> Job:
        body = spec.model_dump(mode="json", exclude_none=True)
        headers = {"Idempotency-Key": request_id or new_request_id()}
        return Job.model_validate(self._call("POST", "/v1/jobs", json=body, headers=headers))

    def get_job(self, name: str) -> Job:
        return Job.model_validate(self._call("GET", f"/v1/{_named(name, 'jobs')}"))

    def list_jobs(self) -> list[Job]:
        return [Job.model_validate(j) for j in self._pages("/v1/jobs", "jobs")]

    def cancel_job(self, name: str) -> Job:
        return Job.model_validate(self._call("POST", f"/v1/{_named(name, 'jobs')}:cancel"))

    def _watch_once(self, name: str) -> Iterator[Job]:
        path = f"/v1/{_named(name, 'jobs')}:watch"
        try:
            with self._http.stream("GET", path, timeout=httpx.Timeout(self.timeout_s, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                yield from _server_sent_jobs(response.iter_lines())
        except httpx.TransportError as exc:
            raise Unavailable(f"the watch of {name} from {self.url} broke off ({exc or type(exc).__name__})") from None

    # Batch predictions --------------------------------------------------------------------------------------------

    def create_batch_prediction(self, spec: BatchPredictionSpec, request_id: str | None = None) -> BatchPrediction:
        headers = {"Idempotency-Key": request_id or new_request_id()}
        body = spec.model_dump(mode="json")
        return BatchPrediction.model_validate(self._call("POST", "/v1/batchPredictions", json=body, headers=headers))

    def get_batch_prediction(self, name: str) -> BatchPrediction:
        return BatchPrediction.model_validate(self._call("GET", f"/v1/{_named(name, 'batchPredictions')}"))

    def list_batch_predictions(self) -> list[BatchPrediction]:
        pages = self._pages("/v1/batchPredictions", "batch_predictions")
        return [BatchPrediction.model_validate(b) for b in pages]

    def cancel_batch_prediction(self, name: str) -> BatchPrediction:
        path = f"/v1/{_named(name, 'batchPredictions')}:cancel"
        return BatchPrediction.model_validate(self._call("POST", path))

    def delete_batch_prediction(self, name: str) -> None:
        self._call("DELETE", f"/v1/{_named(name, 'batchPredictions')}")

    def batch_prediction_results(self, name: str, format: str = "jsonl") -> bytes:
        path = f"/v1/{_named(name, 'batchPredictions')}/results"
        return self.retry.call(lambda: self._send("GET", path, params={"format": format})).content

    # Heads --------------------------------------------------------------------------------------------------------

    def list_heads(self) -> list[Head]:
        return [Head.model_validate(h) for h in self._pages("/v1/heads", "heads")]

    def get_head(self, name: str) -> Head:
        return Head.model_validate(self._call("GET", f"/v1/{_named(name, 'heads')}"))

    def get_head_version(self, name: str, version: int) -> HeadVersion:
        return HeadVersion.model_validate(self._call("GET", f"/v1/{_named(name, 'heads')}/versions/{version}"))

    def delete_head(self, name: str) -> None:
        self._call("DELETE", f"/v1/{_named(name, 'heads')}")

    def delete_head_version(self, name: str, version: int) -> None:
        self._call("DELETE", f"/v1/{_named(name, 'heads')}/versions/{version}")

    def set_alias(self, head: str, alias: str, version: int) -> Head:
        return Head.model_validate(
            self._call("PUT", f"/v1/{_named(head, 'heads')}/aliases/{alias}", json={"version": version})
        )

    def remove_alias(self, head: str, alias: str) -> None:
        self._call("DELETE", f"/v1/{_named(head, 'heads')}/aliases/{alias}")

    def export(self, head: str, format: str = "safetensors", additional_heads: Sequence[str] = ()) -> bytes:
        path = f"/v1/{_named(head, 'heads')}:export"
        params = {"format": format, "additional_heads": list(additional_heads)}
        return self.retry.call(lambda: self._send("GET", path, params=params)).content

    # Shadow versions, feedback and monitoring ---------------------------------------------------------------------

    def set_shadow(self, head: str, version: int) -> Head:
        return Head.model_validate(self._call("PUT", f"/v1/{_named(head, 'heads')}:shadow", json={"version": version}))

    def clear_shadow(self, head: str) -> Head:
        return Head.model_validate(self._call("DELETE", f"/v1/{_named(head, 'heads')}:shadow", safe=True))

    def compare(self, head: str) -> HeadComparisons:
        return HeadComparisons.model_validate(self._call("GET", f"/v1/{_named(head, 'heads')}:compare"))

    def report_feedback(self, prediction_id: str, label: str) -> PredictionFeedback:
        # Not retried once it may have run: a second try would answer 409, as if the label were reported twice.
        path = f"/v1/predictions/{quote(prediction_id.removeprefix('predictions/'), safe='')}:feedback"
        return PredictionFeedback.model_validate(self._call("POST", path, json={"label": label}, safe=False))

    def monitor(self, head: str, version: int | None = None) -> HeadMonitoring:
        name = _named(head, "heads") + ("" if version is None else f"/versions/{version}")
        return HeadMonitoring.model_validate(self._call("GET", f"/v1/{name}:monitor"))

    def clear_drift(self, head: str, version: int) -> HeadMonitoring:
        path = f"/v1/{_named(head, 'heads')}/versions/{version}:clearDrift"
        return HeadMonitoring.model_validate(self._call("POST", path, json={}, safe=True))

    # Prediction and backbones -------------------------------------------------------------------------------------

    def _predict(self, images: list[bytes], heads: list[str], options: PredictOptions) -> list[ImagePrediction]:
        files = [("files", (f"image_{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
        fields = options.model_dump(exclude_none=True)
        data = {"heads": heads} | {key: str(value).lower() for key, value in fields.items()}
        answer = self._send("POST", "/v1/predict:upload", files=files, data=data).json()
        return [ImagePrediction.model_validate(p) for p in answer["predictions"]]

    def create_webhook(self, url: str, event_types: Sequence[str], description: str = "") -> Webhook:
        body = {"url": url, "event_types": list(event_types), "description": description}
        return Webhook.model_validate(self._call("POST", "/v1/webhooks", json=body))

    def get_webhook(self, name: str) -> Webhook:
        return Webhook.model_validate(self._call("GET", f"/v1/{_named(name, 'webhooks')}"))

    def list_webhooks(self) -> list[Webhook]:
        return [Webhook.model_validate(w) for w in self._pages("/v1/webhooks", "webhooks")]

    def delete_webhook(self, name: str) -> None:
        self._call("DELETE", f"/v1/{_named(name, 'webhooks')}")

    def list_webhook_deliveries(self, name: str) -> list[WebhookDelivery]:
        pages = self._pages(f"/v1/{_named(name, 'webhooks')}/deliveries", "deliveries")
        return [WebhookDelivery.model_validate(d) for d in pages]

    def test_webhook(self, name: str) -> WebhookDelivery:
        return WebhookDelivery.model_validate(self._call("POST", f"/v1/{_named(name, 'webhooks')}:test"))

    def list_backbones(self) -> list[Backbone]:
        return [Backbone.model_validate(b) for b in self._call("GET", "/v1/backbones")["backbones"]]

    # Admin (HTTP only: the admin key is for the operator's machine) ------------------------------------------------

    def create_tenant(self, name: str) -> Tenant:
        return Tenant.model_validate(self._call("POST", "/v1/admin/tenants", json={"name": name}))

    def create_key(self, tenant: str, request_id: str | None = None) -> NewKey:
        """A new API key; retried with one idempotency key, so a lost answer never leaves a second key behind."""
        headers = {"Idempotency-Key": request_id or new_request_id()}
        return NewKey.model_validate(self._call("POST", f"/v1/admin/tenants/{tenant}/keys", headers=headers))


def _named(name: str, collection: str) -> str:
    """'x' or 'datasets/x' -> 'datasets/x' (users type bare names, the API speaks resource names)."""
    return name if name.startswith(f"{collection}/") else f"{collection}/{name}"


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        code, message, details = body["code"], body["message"], body.get("details", {})
    except (ValueError, KeyError, TypeError):
        code, message, details = None, response.text[:200] or response.reason_phrase, {}
    retry_after = response.headers.get("Retry-After")
    error = error_for_status(
        response.status_code,
        code,
        message,
        details=details,
        retry_after_s=float(retry_after) if retry_after and retry_after.isdigit() else None,
    )
    if isinstance(error, Unavailable):  # graft's own 503 refused the call; a proxy's 502/503 may follow a run
        error.may_have_run = code != "unavailable"
    raise error


def _server_sent_jobs(lines: Iterable[str]) -> Iterator[Job]:
    """``data: <Job JSON>`` events; an ``event: error`` (e.g. the key was revoked) raises its error."""
    event = "message"
    for line in lines:
        if line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data = json.loads(line.removeprefix("data:"))
            if event == "error":
                raise error_for_status(500, data.get("code"), data.get("message", ""), details=data.get("details"))
            yield Job.model_validate(data)
        elif not line:
            event = "message"
