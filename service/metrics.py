"""graft's own Prometheus metrics, served on ``/metrics`` by the HTTP door (service/http/telemetry.py).

Under ``bentoml serve`` each worker starts with ``PROMETHEUS_MULTIPROC_DIR`` in its
environment, so series made here are written to that folder and ``/metrics``
merges every worker's with prometheus_client's ``MultiProcessCollector``. Outside
a BentoML worker (tests, benchmarks, the library used directly) the variable is
unset and the same series live in prometheus_client's default registry.
"""

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from service.jobs import JobInfo

PREDICTIONS = Counter(
    name="graft_predictions_total",
    documentation="Image x head predictions served, by head kind and door.",
    labelnames=["kind", "door"],
)
BATCH_SIZE = Histogram(
    name="graft_batch_size",
    documentation="Images per trunk pass of the serving batcher.",
    labelnames=["backbone"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
# Summed over live workers: one series per backbone, not one per process id.
QUEUE_DEPTH = Gauge(
    name="graft_queue_depth",
    documentation="Images waiting in the serving batcher.",
    labelnames=["backbone"],
    multiprocess_mode="livesum",
)
JOB_SECONDS = Histogram(
    name="graft_job_duration_seconds",
    documentation="Wall time of finished training jobs, by final state.",
    labelnames=["state"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600),
)
# Fixed cardinality: never a label per head or per tenant.
SHADOW_PREDICTIONS = Counter(
    name="graft_shadow_predictions_total",
    documentation="Images a head's shadow version scored beside the version served (service/monitoring.py).",
)
FEEDBACK = Counter(
    name="graft_feedback_total",
    documentation="Head versions' answers whose true label was reported, by whether they were right.",
    labelnames=["outcome"],
)
MONITOR_WINDOWS = Counter(
    name="graft_monitor_windows_total",
    documentation="Monitoring windows closed (service/monitoring.py), by whether their drift test said drifting.",
    labelnames=["status"],
)


class PrometheusMetrics:
    """The engine's reports (service.engine.predictor.EngineMetrics) as Prometheus series."""

    def batch(self, backbone: str, size: int, queue_depth: int) -> None:
        BATCH_SIZE.labels(backbone=backbone).observe(size)
        QUEUE_DEPTH.labels(backbone=backbone).set(queue_depth)

    def predictions(self, kind: str, door: str, count: int) -> None:
        PREDICTIONS.labels(kind=kind, door=door).inc(count)

    def shadow_predictions(self, count: int) -> None:
        SHADOW_PREDICTIONS.inc(count)

    def feedback(self, correct: bool) -> None:
        FEEDBACK.labels(outcome="correct" if correct else "incorrect").inc()

    def monitor_window(self, drifting: bool) -> None:
        MONITOR_WINDOWS.labels(status="drifting" if drifting else "ok").inc()

    def job_finished(self, job: "JobInfo") -> None:
        if job.finished_at is not None:
            seconds = (job.finished_at - (job.started_at or job.created_at)).total_seconds()
            JOB_SECONDS.labels(state=job.state.value).observe(seconds)
