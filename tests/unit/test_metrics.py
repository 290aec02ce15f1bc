"""graft's Prometheus series: what each report records, in one process and as BentoML's workers export them."""

import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from service.jobs import JobInfo, JobState
from service.metrics import PrometheusMetrics
from service.training import TrainRequest

REPO = Path(__file__).resolve().parents[2]


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def finished_job(state: JobState, started: datetime | None, finished: datetime | None) -> JobInfo:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    return JobInfo(
        id="job-1",
        tenant="t",
        state=state,
        phase="done",
        progress=1.0,
        message="",
        metrics={},
        request=TrainRequest(dataset_id="d", head_name="h"),
        head="h",
        head_version=None,
        error=None,
        created_at=created,
        started_at=started,
        finished_at=finished,
    )


def test_a_batch_records_its_size_and_sets_the_queue_depth() -> None:
    labels = {"backbone": "unit-batch"}
    PrometheusMetrics().batch("unit-batch", size=8, queue_depth=3)
    PrometheusMetrics().batch("unit-batch", size=2, queue_depth=0)
    assert sample("graft_batch_size_count", labels) == 2
    assert sample("graft_batch_size_sum", labels) == 10
    assert sample("graft_batch_size_bucket", {**labels, "le": "2.0"}) == 1
    assert sample("graft_queue_depth", labels) == 0


def test_predictions_are_counted_by_head_kind_and_door() -> None:
    metrics = PrometheusMetrics()
    metrics.predictions("linear", "unit-http", 3)
    metrics.predictions("linear", "unit-http", 2)
    metrics.predictions("mlp", "unit-grpc", 1)
    assert sample("graft_predictions_total", {"kind": "linear", "door": "unit-http"}) == 5
    assert sample("graft_predictions_total", {"kind": "mlp", "door": "unit-grpc"}) == 1


def test_a_finished_job_records_its_run_time_from_its_start() -> None:
    start = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    before = sample("graft_job_duration_seconds_sum", {"state": "failed"})
    PrometheusMetrics().job_finished(finished_job(JobState.FAILED, start, start + timedelta(seconds=42)))
    assert sample("graft_job_duration_seconds_sum", {"state": "failed"}) - before == 42


def test_a_job_cancelled_before_it_started_counts_from_its_creation() -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    before = sample("graft_job_duration_seconds_sum", {"state": "cancelled"})
    PrometheusMetrics().job_finished(finished_job(JobState.CANCELLED, None, created + timedelta(seconds=5)))
    assert sample("graft_job_duration_seconds_sum", {"state": "cancelled"}) - before == 5


def test_a_job_without_an_end_records_nothing() -> None:
    before = sample("graft_job_duration_seconds_count", {"state": "running"})
    PrometheusMetrics().job_finished(finished_job(JobState.RUNNING, datetime.now(UTC), None))
    assert sample("graft_job_duration_seconds_count", {"state": "running"}) == before


def test_a_bentoml_worker_exports_every_series_through_the_multiprocess_folder(tmp_path: Path) -> None:
    """A worker starts with PROMETHEUS_MULTIPROC_DIR set; BentoML's /metrics merges that folder."""
    worker = textwrap.dedent(
        """
        from service.metrics import PrometheusMetrics
        metrics = PrometheusMetrics()
        metrics.batch("mobilenet_v2", size=4, queue_depth=7)
        metrics.predictions("linear", "http", 4)
        """
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", worker], cwd=REPO, env=env, check=True, timeout=120)

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    exported = generate_latest(registry).decode()
    assert 'graft_predictions_total{door="http",kind="linear"} 4.0' in exported
    assert 'graft_batch_size_count{backbone="mobilenet_v2"} 1.0' in exported
    # One queue depth per backbone, summed over live workers, not one series per process id.
    assert 'graft_queue_depth{backbone="mobilenet_v2"} 7.0' in exported
