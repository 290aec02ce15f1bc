"""Monitoring per head version: a reference fitted at training, windows closed per replica at the window size,
a drift test that marks the version drifting (and :clearDrift), both doors, bounds, and tenant isolation."""

import shutil
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from adapters.kinds import HeadKind
from harness.sample_data import fashion_mnist_pngs, textile_files
from service.calls import Calls, KeyCheck
from service.config import Settings
from service.core import Core
from service.engine.predictor import HeadPrediction, LabelScore, Served
from service.errors import InvalidArgument, NotFound
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.metrics import PrometheusMetrics
from service.prediction_options import PredictOptions
from service.runtime import Runtime
from service.store.db import MonitorWindowRow
from service.training import TrainRequest
from tests.unit.test_engine import TENANT, png, save_random_head

pytestmark = pytest.mark.anyio

WINDOW = 30  # the smallest window a drift test runs on (adapters/monitoring.py MIN_DRIFT_ROWS)
SHIFTED = [data for data, _ in fashion_mnist_pngs("test", per_class=3, seed=1)][:WINDOW]
# Textile images the head never saw, the classes in turn (as the training rows mix them)
UNSEEN = [data for _, data, _ in sorted(textile_files(per_class=12, offset=100), key=lambda f: f[0].split("/")[1])]
RANDOM = [png(seed) for seed in range(8)]
WINDOW_FIELDS = "end_time predictions label_counts label_distance confidence_histogram abstention_rate ood_rate "
WINDOW_FIELDS += "mean_ood_score drift"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_core) -> Path:
    """A data folder whose registry holds 'textile' version 1, a prototype head on textile JPEGs."""
    data_dir = tmp_path_factory.mktemp("trained")
    core = make_core(data_dir)
    files = textile_files(per_class=20)
    dataset = core.datasets.create(TENANT, "textile", files)
    core.trainer.train(TENANT, TrainRequest(dataset_id=dataset.id, head_name="textile", kind="prototype"))
    core.db.close()
    return data_dir


def open_runtime(data_dir: Path, mobilenet, metrics: PrometheusMetrics | None = None, **settings) -> Runtime:
    core = Core.open(Settings(data_dir=data_dir, **settings), backbones=[])
    core.backbones[mobilenet.name] = mobilenet
    return Runtime.around(core, metrics)


@pytest.fixture
def copied(trained, tmp_path) -> Path:
    """The trained registry, copied: each test may change it."""
    shutil.copytree(trained, tmp_path / "data")
    return tmp_path / "data"


def calls(runtime: Runtime, tenant: str = TENANT) -> Calls:
    return Calls(runtime, KeyCheck(runtime, None, tenant, 60.0))


async def predict(runtime: Runtime, images: list[bytes], ref: str) -> None:
    await calls(runtime).predict(images, [ref], PredictOptions(), door="test")


async def test_a_trained_version_gets_a_monitoring_reference_loaded_with_it(copied, mobilenet):
    runtime = open_runtime(copied, mobilenet)
    info = runtime.core.heads.resolve(TENANT, "textile@1")
    assert info.monitor_blob_key is not None
    head = await runtime.predictor.heads.get(TENANT, "textile@1")
    assert head.monitoring is not None and head.monitoring.components.shape[0] == 1280
    monitoring = await calls(runtime).head_monitoring("heads/textile")
    assert (monitoring.version, monitoring.reference, monitoring.reference_note) == (1, True, None)
    assert monitoring.labels == ["global", "local", "nominal"]
    assert monitoring.training_label_distribution == pytest.approx([1 / 3] * 3, abs=0.02)
    assert (monitoring.status.value, monitoring.windows, monitoring.live.labelled) == ("ok", [], 0)


async def test_windows_close_at_the_window_size_with_their_summary_and_drift_test(copied, mobilenet):
    runtime = open_runtime(copied, mobilenet, monitor_window=WINDOW)
    await predict(runtime, UNSEEN[:20], "textile")
    assert (await calls(runtime).head_monitoring("heads/textile/versions/1")).windows == []  # 20 of 30: open
    await predict(runtime, UNSEEN[20:35], "textile")  # crosses the size: one window of 30, 5 images open
    [window] = (await calls(runtime).head_monitoring("heads/textile/versions/1")).windows
    assert window.predictions == WINDOW and sum(window.label_counts) == WINDOW
    assert sum(window.confidence_histogram) == WINDOW
    assert window.ood_rate is not None and window.mean_ood_score is not None and window.label_distance is not None
    assert window.drift is not None and window.drift.window == WINDOW and window.drift.test == "mmd-rbf-permutation"
    assert not window.drift.drifting  # unseen images of the training classes
    assert (await calls(runtime).head_monitoring("heads/textile")).status.value == "ok"


async def test_a_shifted_window_marks_the_version_drifting_with_evidence_until_cleared(copied, mobilenet):
    runtime = open_runtime(copied, mobilenet, PrometheusMetrics(), monitor_window=WINDOW)
    before = {status: _windows_counted(status) for status in ("ok", "drifting")}
    await predict(runtime, SHIFTED, "textile")  # Fashion-MNIST into a textile head
    monitoring = await calls(runtime).head_monitoring("heads/textile")
    [window] = monitoring.windows
    assert window.drift is not None and window.drift.drifting and window.drift.p_value <= 0.01
    assert monitoring.status.value == "drifting"
    assert monitoring.evidence == window and monitoring.drifting_since == window.end_time
    assert _windows_counted("drifting") - before["drifting"] == 1 and _windows_counted("ok") == before["ok"]

    cleared = await calls(runtime).clear_head_drift("heads/textile/versions/1")
    assert (cleared.status.value, cleared.drifting_since, cleared.evidence) == ("ok", None, None)
    assert cleared.windows == [window]  # the windows stay; the status is what was accepted


def _windows_counted(status: str) -> float:
    return REGISTRY.get_sample_value("graft_monitor_windows_total", {"status": status}) or 0.0


async def test_monitoring_off_keeps_no_embeddings_loads_no_reference_and_writes_no_windows(copied, mobilenet):
    runtime = open_runtime(copied, mobilenet, monitoring=False, monitor_window=4)
    assert not runtime.monitor.keeps_embeddings
    await predict(runtime, UNSEEN[:8], "textile")
    assert (await runtime.predictor.heads.get(TENANT, "textile@1")).monitoring is None
    assert len(runtime.monitor.windows) == 0
    assert (await calls(runtime).head_monitoring("heads/textile")).windows == []


@pytest.fixture
def random_heads(make_core, tmp_path) -> Path:
    """'h' versions 1 and 2, random weights saved directly: no monitoring reference."""
    core = make_core(tmp_path)
    save_random_head(core, "h", HeadKind.LINEAR, seed=1)
    save_random_head(core, "h", HeadKind.LINEAR, seed=2)
    core.db.close()
    return tmp_path


async def test_a_version_without_reference_says_why_and_still_counts(random_heads, mobilenet):
    runtime = open_runtime(random_heads, mobilenet, monitor_window=4)
    await predict(runtime, RANDOM[:4], "h@1")
    monitoring = await calls(runtime).head_monitoring("heads/h/versions/1")
    assert not monitoring.reference and "fewer than 10 training examples" in (monitoring.reference_note or "")
    assert monitoring.training_label_distribution is None
    [window] = monitoring.windows
    assert (window.predictions, sum(window.label_counts)) == (4, 4)
    assert (window.ood_rate, window.mean_ood_score, window.drift) == (None, None, None)


async def test_two_runtimes_on_one_database_combine_their_windows_by_end_time(random_heads, mobilenet):
    first = open_runtime(random_heads, mobilenet, monitor_window=2)
    second = open_runtime(random_heads, mobilenet, monitor_window=2)
    await predict(first, RANDOM[:2], "h")
    await predict(second, RANDOM[2:6], "h")
    await second.monitor.flush()
    windows = (await calls(first).head_monitoring("heads/h")).windows
    assert [w.predictions for w in windows] == [2, 2, 2]
    assert [w.end_time for w in windows] == sorted(w.end_time for w in windows)
    replicas = first.core.db.session
    with replicas() as session:
        assert len(set(session.scalars(select(MonitorWindowRow.replica)))) == 2


async def test_windows_are_dropped_with_their_version_and_head(random_heads, mobilenet):
    runtime = open_runtime(random_heads, mobilenet, monitor_window=2)
    await predict(runtime, RANDOM[:2], "h@1")
    await predict(runtime, RANDOM[:2], "h@2")
    await runtime.monitor.flush()
    assert _stored_windows(runtime) == 2
    await calls(runtime).delete_head_version("heads/h/versions/1")
    assert _stored_windows(runtime) == 1
    await predict(runtime, RANDOM[:2], "h@2")  # closed on this replica, written after the head is gone
    await calls(runtime).delete_head("heads/h")
    await runtime.monitor.flush()
    assert _stored_windows(runtime) == 0


def _stored_windows(runtime: Runtime) -> int:
    with runtime.core.db.session() as session:
        return session.scalar(select(func.count()).select_from(MonitorWindowRow)) or 0


async def test_the_newest_windows_are_kept_and_a_replica_holds_a_bounded_number_of_windows(random_heads, mobilenet):
    runtime = open_runtime(random_heads, mobilenet, monitor_window=2, monitor_windows_kept=2, monitor_max_versions=1)
    await predict(runtime, RANDOM[:6], "h@1")  # three windows closed before a flush: one is held, two dropped
    assert runtime.monitor.windows.dropped == 2
    await runtime.monitor.flush()
    for _ in range(2):
        await predict(runtime, RANDOM[:2], "h@1")
        await runtime.monitor.flush()
    assert _stored_windows(runtime) == 2  # three written, the newest two kept

    await predict(runtime, RANDOM[:1], "h@1")
    await predict(runtime, RANDOM[:1], "h@2")  # one open window per replica: h@1's half window is dropped
    assert len(runtime.monitor.windows) == 1 and runtime.monitor.windows.dropped == 3
    await predict(runtime, RANDOM[:1], "h@1")
    await runtime.monitor.flush()
    assert _stored_windows(runtime) == 2 and (await calls(runtime).head_monitoring("heads/h/versions/2")).windows == []


async def test_another_tenant_cannot_read_or_clear_a_versions_monitoring(random_heads, mobilenet):
    runtime = open_runtime(random_heads, mobilenet, monitor_window=2)
    await predict(runtime, RANDOM[:2], "h")
    other = calls(runtime, "other")
    for call in (other.head_monitoring("heads/h"), other.head_monitoring("heads/h/versions/1")):
        with pytest.raises(NotFound):
            await call
    with pytest.raises(NotFound):
        await other.clear_head_drift("heads/h/versions/1")
    with pytest.raises(InvalidArgument):
        await calls(runtime).clear_head_drift("heads/h")  # a version is named


async def test_over_http_both_monitor_routes_and_clear_drift_answer_the_contract(random_heads, mobilenet):
    runtime = open_runtime(random_heads, mobilenet, monitor_window=2)
    runtime.tenants.create_tenant(TENANT)
    key = runtime.tenants.create_key(TENANT)
    app = create_app(runtime.settings, lambda: runtime)
    headers = {"Authorization": f"Bearer {key.secret}"}
    await predict(runtime, RANDOM[:2], "h@2")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://graft") as client:
        latest = await client.get("/v1/heads/h:monitor", headers=headers)
        assert latest.status_code == 200
        body = latest.json()
        assert (body["head"], body["version"], body["status"], body["drifting_since"]) == ("h", 2, "ok", None)
        assert body["live"] == {"labelled": 0, "accuracy": None}
        [window] = body["windows"]
        assert set(window) == set(WINDOW_FIELDS.split())
        one = await client.get("/v1/heads/h/versions/1:monitor", headers=headers)
        assert one.status_code == 200 and one.json()["version"] == 1 and one.json()["windows"] == []
        cleared = await client.post("/v1/heads/h/versions/2:clearDrift", headers=headers)
        assert cleared.status_code == 200 and cleared.json()["status"] == "ok"
        assert (await client.get("/v1/heads/h/versions/9:monitor", headers=headers)).status_code == 404
        assert (await client.get("/v1/heads/nope:monitor", headers=headers)).status_code == 404


async def test_over_grpc_monitoring_is_read_by_either_name_and_drift_cleared(random_heads, mobilenet):
    runtime = open_runtime(random_heads, mobilenet, monitor_window=2)
    runtime.tenants.create_tenant(TENANT)
    key = runtime.tenants.create_key(TENANT)
    await predict(runtime, RANDOM[:2], "h@2")
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    metadata = (("authorization", f"Bearer {key.secret}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            heads = rpc.HeadServiceStub(channel)
            latest = await heads.GetHeadMonitoring(api.GetHeadMonitoringRequest(name="heads/h"), metadata=metadata)
            assert (latest.head, latest.version, latest.status) == ("h", 2, api.DRIFT_STATUS_OK)
            assert not latest.reference and latest.reference_note
            [window] = latest.windows
            assert window.predictions == 2 and not window.HasField("drift") and not window.HasField("ood_rate")
            named = await heads.GetHeadMonitoring(
                api.GetHeadMonitoringRequest(name="heads/h/versions/1"), metadata=metadata
            )
            assert named.version == 1 and not named.windows
            cleared = await heads.ClearHeadDrift(
                api.ClearHeadDriftRequest(name="heads/h/versions/2"), metadata=metadata
            )
            assert cleared.status == api.DRIFT_STATUS_OK
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await heads.GetHeadMonitoring(api.GetHeadMonitoringRequest(name="heads/nope"), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(grace=1)


async def test_answers_monitoring_cannot_count_are_left_out_without_failing_the_request(random_heads, mobilenet):
    runtime = open_runtime(random_heads, mobilenet, monitor_window=2)
    head = await runtime.predictor.heads.get(TENANT, "h@1")
    broken = HeadPrediction(head="h", version=1, top=[LabelScore(label="c0", score=float("nan"))])
    ids = runtime.monitor.observe(TENANT, [Served(head, None, [broken], None)], {})
    assert len(ids) == 1
    await predict(runtime, RANDOM[:2], "h@1")
    [window] = (await calls(runtime).head_monitoring("heads/h/versions/1")).windows
    assert window.predictions == 2  # the broken answer was not counted
