"""What every graft client does, whichever transport carries it (HTTP or gRPC).

Subclasses implement the calls one by one; this class holds what is the same:
turning a dataset source into a stream of examples, cutting predictions into
concurrent batches, following a job to its end.
"""

import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

from pydantic import ValidationError

from client import sources
from client.errors import InvalidArgument, Unavailable
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
    HyperParams,
    ImagePrediction,
    Job,
    LabelImport,
    PredictionFeedback,
    PredictOptions,
    SearchSpace,
    Suggestions,
    TrainingSpec,
    Webhook,
    WebhookDelivery,
)
from client.retry import RetryPolicy
from client.sources import Example

# (bytes sent, images sent) so far; called as an upload goes.
UploadProgress = Callable[[int, int], None]
DatasetSource = str | os.PathLike | Iterable[tuple[Any, str]]
Image = str | os.PathLike | bytes | Any  # a path, encoded bytes, or a PIL image

DEFAULT_TIMEOUT_S = 60.0
IDEMPOTENCY_METADATA = "idempotency-key"  # gRPC metadata; HTTP sends the Idempotency-Key header
AUDIT_TIMEOUT_S = 600.0  # an audit of a new dataset computes its features first
PREDICT_BATCH = 16  # images per request (the server takes up to GRAFT_MAX_IMAGES_PER_REQUEST, 64 by default)


class Client(ABC):
    """A graft client; ``client.connect(url)`` makes one. Every call raises a ``client.errors.GraftError``."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float, retry: RetryPolicy) -> None:
        self.url = url
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retry = retry

    # Datasets -----------------------------------------------------------------------------------------------------

    def create_dataset(
        self,
        source: DatasetSource,
        display_name: str,
        progress: UploadProgress | None = None,
        request_id: str | None = None,
    ) -> Dataset:
        """Upload a class-folder directory, a zip, a CSV of ``path,label`` or in-memory (image, label) pairs.

        Images are read one at a time as they are sent. Every try of one call carries one idempotency key
        (``request_id``, default a fresh UUID), so a file source is retried even when a try may have reached the
        server (a dropped connection): the server answers the dataset that try made instead of making another.
        An in-memory iterable is read once and never retried.
        """
        request_id = request_id or new_request_id()
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            if path.is_dir():
                examples = sources.from_directory(path)
            elif path.suffix.lower() == ".zip":
                return self.retry.call(lambda: self._upload_zip(display_name, path, progress, request_id))
            elif path.suffix.lower() == ".csv":
                examples = sources.from_csv(path)
            else:
                raise ValueError(f"{path}: give a class-folder directory, a .zip or a .csv of path,label")
            return self.retry.call(lambda: self._upload_examples(display_name, examples, progress, request_id))
        return self._upload_examples(display_name, sources.from_memory(source), progress, request_id)

    @abstractmethod
    def _upload_examples(
        self, display_name: str, examples: Iterable[Example], progress: UploadProgress | None, request_id: str
    ) -> Dataset: ...

    @abstractmethod
    def _upload_zip(
        self, display_name: str, path: Path, progress: UploadProgress | None, request_id: str
    ) -> Dataset: ...

    @abstractmethod
    def get_dataset(self, name: str) -> Dataset: ...

    @abstractmethod
    def list_datasets(self) -> list[Dataset]: ...

    @abstractmethod
    def delete_dataset(self, name: str) -> None: ...

    @abstractmethod
    def list_examples(self, dataset: str) -> list[DatasetExample]:
        """The dataset's examples in upload order, each with the file name and client id its upload gave it."""

    @abstractmethod
    def label_example(self, dataset: str, example: str, label: str | None) -> DatasetExample:
        """Label one example (by client id or position); None unlabels it."""

    @abstractmethod
    def label_examples(self, dataset: str, labels: Mapping[str, str | None]) -> list[DatasetExample]:
        """Label several examples at once, {client id or position: label or None}: all or none."""

    @abstractmethod
    def import_labels(self, dataset: str, rows: bytes) -> LabelImport:
        """Label examples from CSV ``file,label`` rows (file name or client id; an empty label unlabels): all or
        none."""

    @abstractmethod
    def audit_dataset(
        self,
        name: str,
        *,
        backbone: str | None = None,
        max_suspects: int = 0,
        max_duplicates: int = 0,
        duplicate_similarity: float | None = None,
    ) -> DatasetAudit:
        """Images whose label is probably wrong, ranked, with suggested labels; near-duplicates under two labels.

        0 / None take the server's defaults (50 items each, its GRAFT_DEFAULT_BACKBONE, similarity 0.98). The server
        computes features it has not cached first, so the call may take as long as a training job's extraction.
        """

    @abstractmethod
    def suggest_examples(
        self, dataset: str, head: str, *, count: int = 0, strategy: str | None = None, seed: int = 0
    ) -> Suggestions:
        """The dataset's unlabelled examples worth labelling next for ``head`` (a name, name@3 or name:alias), best
        first, each with the reason. 0 / None take the server's defaults (20, diverse_margin); like an audit, the
        server computes features it has not cached first."""

    # Jobs ---------------------------------------------------------------------------------------------------------

    def train(
        self,
        dataset: str,
        head: str,
        *,
        kind: str | None = None,
        backbone: str | None = None,
        search: SearchSpace | dict | None = None,
        hyperparams: HyperParams | dict | None = None,
        **spec: Any,
    ) -> Job:
        """Queue a training job (returns at once, state ``queued``); ``wait`` or ``watch`` follows it."""
        name = dataset if dataset.startswith("datasets/") else f"datasets/{dataset}"
        fields = {"kind": kind, "backbone": backbone, "search": search, "hyperparams": hyperparams, **spec}
        return self.create_job(
            TrainingSpec(dataset=name, head=head, **{k: v for k, v in fields.items() if v is not None})
        )

    @abstractmethod
    def create_job(self, spec: TrainingSpec, request_id: str | None = None) -> Job:
        """Queue a job. Its tries share one idempotency key (``request_id``, default a fresh UUID): however often
        a lost answer makes the client send it again, the server creates one job."""

    @abstractmethod
    def get_job(self, name: str) -> Job: ...

    @abstractmethod
    def list_jobs(self) -> list[Job]: ...

    @abstractmethod
    def cancel_job(self, name: str) -> Job: ...

    def watch(self, name: str) -> Iterator[Job]:
        """The job now, then on every change, until it is done; a stream the network drops is opened again."""
        attempt = 0
        while True:
            try:
                for job in self._watch_once(name):
                    attempt = 0
                    yield job
                    if job.done:
                        return
                return
            except Unavailable as error:
                attempt += 1
                if attempt >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay(attempt - 1, error))

    @abstractmethod
    def _watch_once(self, name: str) -> Iterator[Job]: ...

    def wait(self, name: str, on_update: Callable[[Job], None] | None = None) -> Job:
        """Follow the job until it ends and return its last state (check ``state``: it may have failed)."""
        job = None
        for job in self.watch(name):
            if on_update is not None:
                on_update(job)
        assert job is not None  # a watch yields the job at least once
        return job

    # Batch predictions --------------------------------------------------------------------------------------------

    def predict_dataset(
        self, dataset: str, heads: Sequence[str], *, top_k: int = 5, min_score: float = 0.0
    ) -> BatchPrediction:
        """Queue a batch prediction of ``heads`` over every example of ``dataset`` (returns at once, ``queued``);
        ``wait_batch_prediction`` follows it, ``batch_prediction_results`` downloads its results."""
        name = dataset if dataset.startswith("datasets/") else f"datasets/{dataset}"
        spec = BatchPredictionSpec(dataset=name, heads=list(heads), top_k=top_k, min_score=min_score)
        return self.create_batch_prediction(spec)

    @abstractmethod
    def create_batch_prediction(self, spec: BatchPredictionSpec, request_id: str | None = None) -> BatchPrediction:
        """Queue a batch prediction; its tries share one idempotency key, so the server creates one."""

    @abstractmethod
    def get_batch_prediction(self, name: str) -> BatchPrediction: ...

    @abstractmethod
    def list_batch_predictions(self) -> list[BatchPrediction]: ...

    @abstractmethod
    def cancel_batch_prediction(self, name: str) -> BatchPrediction: ...

    @abstractmethod
    def delete_batch_prediction(self, name: str) -> None: ...

    @abstractmethod
    def batch_prediction_results(self, name: str, format: str = "jsonl") -> bytes:
        """The results file of a succeeded batch prediction: ``jsonl`` (one object per example) or ``csv``."""

    def wait_batch_prediction(
        self, name: str, on_update: Callable[[BatchPrediction], None] | None = None, poll_s: float = 0.5
    ) -> BatchPrediction:
        """Poll the batch prediction until it ends and return its last state (check ``state``: it may have failed)."""
        while True:
            batch = self.get_batch_prediction(name)
            if on_update is not None:
                on_update(batch)
            if batch.done:
                return batch
            time.sleep(poll_s)

    # Heads --------------------------------------------------------------------------------------------------------

    @abstractmethod
    def list_heads(self) -> list[Head]: ...

    @abstractmethod
    def get_head(self, name: str) -> Head:
        """The head with its versions and aliases; each version's ``metrics`` is its summary (accuracy, ECE, ...)."""

    @abstractmethod
    def get_head_version(self, name: str, version: int) -> HeadVersion:
        """One version of head ``name`` with its whole metrics (per class, confusion matrix, calibration, trials)."""

    @abstractmethod
    def delete_head(self, name: str) -> None: ...

    @abstractmethod
    def delete_head_version(self, name: str, version: int) -> None: ...

    @abstractmethod
    def set_alias(self, head: str, alias: str, version: int) -> Head: ...

    @abstractmethod
    def remove_alias(self, head: str, alias: str) -> None: ...

    @abstractmethod
    def export(self, head: str, format: str = "safetensors", additional_heads: Sequence[str] = ()) -> bytes:
        """The head as a file: ``safetensors`` weights, or ``onnx`` / ``pt2``: backbone + head in one file,
        probabilities out, with class names, input transforms and provenance in its ``graft.json`` metadata.

        ``additional_heads`` (onnx and pt2): more heads on the same backbone, one more output each.
        """

    # Shadow versions, feedback and monitoring ---------------------------------------------------------------------

    @abstractmethod
    def set_shadow(self, head: str, version: int) -> Head:
        """Have ``version`` answer every prediction of ``head`` beside the version served, on the same trunk pass;
        callers keep getting the served answer. Replaces any shadow the head had."""

    @abstractmethod
    def clear_shadow(self, head: str) -> Head:
        """Stop shadowing; the comparison figures are kept."""

    @abstractmethod
    def compare(self, head: str) -> HeadComparisons:
        """How each shadow version answered beside the served one (agreement, confusion, accuracy on feedback)."""

    @abstractmethod
    def report_feedback(self, prediction_id: str, label: str) -> PredictionFeedback:
        """The true label of an image predicted earlier (``ImagePrediction.prediction_id``), once per prediction:
        it scores the served and the shadow versions' answers."""

    @abstractmethod
    def monitor(self, head: str, version: int | None = None) -> HeadMonitoring:
        """A version's live traffic window by window, and whether its inputs drift from its training data
        (``status``); ``version`` None: the version the head serves by default."""

    @abstractmethod
    def clear_drift(self, head: str, version: int) -> HeadMonitoring:
        """Set a version's status back to ok once its traffic was looked at and accepted; the next drifting
        window marks it again."""

    # Prediction ---------------------------------------------------------------------------------------------------

    def predict(
        self,
        images: Iterable[Image],
        heads: str | list[str],
        *,
        batch_size: int = PREDICT_BATCH,
        concurrency: int = 4,
        **options: Any,
    ) -> list[ImagePrediction]:
        """Top-k labels of each image for each head (``name``, ``name@3`` or ``name:alias``), in order.

        ``options`` are the fields of ``client.models.PredictOptions`` (``top_k=2``, ``coverage=0.9``, ...),
        checked before anything is sent. A head whose top score is below ``min_score`` answers ``abstained``;
        with ``coverage`` each answer carries a ``prediction_set`` holding the true label with that
        probability. Images are sent in batches of ``batch_size``, ``concurrency`` batches at once; one trunk
        pass on the server serves every head named here.
        """
        asked = _predict_options(options)
        head_list = [heads] if isinstance(heads, str) else list(heads)
        batches: list[list[Image]] = []
        for image in images:
            if not batches or len(batches[-1]) == batch_size:
                batches.append([])
            batches[-1].append(image)

        def run(batch: list[Image]) -> list[ImagePrediction]:
            data = [_image_bytes(image) for image in batch]
            return self.retry.call(lambda: self._predict(data, head_list, asked))

        with ThreadPoolExecutor(max(1, min(concurrency, len(batches)))) as pool:
            return [prediction for answer in pool.map(run, batches) for prediction in answer]

    @abstractmethod
    def _predict(self, images: list[bytes], heads: list[str], options: PredictOptions) -> list[ImagePrediction]: ...

    # Webhooks -----------------------------------------------------------------------------------------------------

    @abstractmethod
    def create_webhook(self, url: str, event_types: Sequence[str], description: str = "") -> Webhook:
        """Register an endpoint; the answer's ``secret`` (verify deliveries with ``verify_webhook``) is never
        shown again."""

    @abstractmethod
    def get_webhook(self, name: str) -> Webhook: ...

    @abstractmethod
    def list_webhooks(self) -> list[Webhook]: ...

    @abstractmethod
    def delete_webhook(self, name: str) -> None: ...

    @abstractmethod
    def list_webhook_deliveries(self, name: str) -> list[WebhookDelivery]:
        """The webhook's deliveries, newest first."""

    @abstractmethod
    def test_webhook(self, name: str) -> WebhookDelivery:
        """Queue a ``webhook.test`` event for this webhook alone."""

    # Backbones ----------------------------------------------------------------------------------------------------

    @abstractmethod
    def list_backbones(self) -> list[Backbone]: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def new_request_id() -> str:
    """A fresh idempotency key: one per logical call, the same on each of its retries."""
    return str(uuid.uuid4())


def _predict_options(fields: dict[str, Any]) -> PredictOptions:
    """The options a predict call names; a wrong name or value raises InvalidArgument, as the server would."""
    try:
        return PredictOptions(**fields)
    except ValidationError as exc:
        raise InvalidArgument("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None


def _image_bytes(image: Image) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    return sources.image_reader(image)()
