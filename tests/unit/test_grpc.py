"""The gRPC door in-process: a real grpc.aio server on a free loopback port, without a backbone.

The end-to-end flows (upload, train, predict, export) run against `bentoml serve`
in test_grpc_e2e.py; these check the door's own limits cheaply, with real parts
and no backbone loaded.
"""

import asyncio
import contextlib
import io
import os
import threading
from typing import NamedTuple

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from sqlalchemy import event

from client import cli
from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from harness.inprocess import serve_http
from service.auth import OPEN_TENANT
from service.config import Settings
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import default_host, start_grpc_server
from service.http.app import create_app
from service.runtime import Runtime
from service.training import FeatureMemory, TrainingCost

pytestmark = pytest.mark.anyio


async def serve(runtime: Runtime):
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return server, channel


@pytest.fixture
async def channel(tmp_path):
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="open", backbones=[], max_upload_bytes=1000))
    server, channel = await serve(runtime)
    async with channel:
        yield channel
    await server.stop(grace=1)


async def keyed_server(tmp_path, **settings):
    """A server that needs API keys and re-checks them every 0.1 s; and one key."""
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="keys", backbones=[], key_recheck_s=0.1, **settings))
    runtime.tenants.create_tenant("acme")
    key = runtime.tenants.create_key("acme")
    server, channel = await serve(runtime)
    async with channel:
        yield runtime, channel, [("authorization", f"Bearer {key.secret}")], key.key_id
    await server.stop(grace=1)


@pytest.fixture
async def keyed(tmp_path):
    """Uploads in progress may hold 3,000 bytes together."""
    async for server in keyed_server(tmp_path, max_inflight_upload_bytes=3000):
        yield server


@pytest.fixture
async def impatient(tmp_path):
    """Uploads must end within half a second."""
    async for server in keyed_server(tmp_path, upload_timeout_s=0.5):
        yield server


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 * side^2 bytes."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(3 * side * side)).save(buf, format="PNG")
    return buf.getvalue()


def header(name: str = "ds") -> api.CreateDatasetRequest:
    return api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name=name))


def image(name: str, data: bytes, label: str) -> api.CreateDatasetRequest:
    return api.CreateDatasetRequest(image=api.CreateDatasetRequest.Image(file_name=name, label=label, data=data))


async def test_an_unknown_backbone_is_not_found(channel):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await rpc.BackboneServiceStub(channel).GetBackbone(api.GetBackboneRequest(name="backbones/nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in error.value.details()


async def test_an_upload_is_refused_at_the_file_that_crosses_the_byte_limit(channel):
    """Checked as messages arrive, before the images are validated: the rest is never held."""

    async def upload():
        yield header("big")
        for i in range(50):
            yield image(f"{i}.png", b"x" * 600, "a")

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await rpc.DatasetServiceStub(channel).CreateDataset(upload())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 1,000 bytes at file '1.png'" in error.value.details()


# -- unchecked values are INVALID_ARGUMENT, never UNKNOWN or INTERNAL ------------------------


async def expect_invalid(call, request, text: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert text in error.value.details()


async def test_an_unknown_head_kind_is_invalid_argument(channel):
    spec = pb.TrainingSpec(dataset="datasets/ds_1", head="h", kind=99)
    await expect_invalid(rpc.JobServiceStub(channel).CreateJob, api.CreateJobRequest(spec=spec), "kind 99")


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"objective": 7}, "objective 7 is not a known objective; use one of OBJECTIVE_ACCURACY, "),
        ({"class_weighting": 7}, "class_weighting 7 is not a known class weighting; use one of CLASS_WEIGHTING_NONE"),
        ({"scaling": 9}, "scaling 9 is not a known feature scaling; use one of FEATURE_SCALING_NONE"),
        ({"kind": pb.HEAD_KIND_PROTOTYPE, "scaling": pb.FEATURE_SCALING_L2}, "scaling applies to kind"),
        ({"kind": pb.HEAD_KIND_FINETUNE, "scaling": pb.FEATURE_SCALING_NONE}, "scaling applies to kind"),
        ({"kind": pb.HEAD_KIND_PROTOTYPE, "class_weighting": pb.CLASS_WEIGHTING_NONE}, "class_weighting applies to"),
    ],
)
async def test_an_unknown_recipe_value_or_one_the_kind_does_not_take_is_invalid_argument(channel, options, text):
    spec = pb.TrainingSpec(dataset="datasets/ds_1", head="h", **options)
    await expect_invalid(rpc.JobServiceStub(channel).CreateJob, api.CreateJobRequest(spec=spec), text)


class Jobs(NamedTuple):
    stub: rpc.JobServiceStub
    runtime: Runtime
    dataset: str  # datasets/{dataset}
    port: int  # the gRPC door's


@pytest.fixture
async def jobs(tmp_path):
    """A JobService stub, the runtime behind it and a dataset there. Jobs are created and never run (the runtime
    is not started); the trainer's cost check reads the dataset only, as no backbone is loaded."""
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="open", backbones=[]))
    datasets = runtime.core.datasets

    def cost(tenant, request):
        images = datasets.get(tenant, request.dataset_id).num_examples
        memory = FeatureMemory(backbone="mobilenet_v2", split="pooled", elements=1280, bytes=images * 1280 * 12)
        return TrainingCost(epochs=request.epochs, images=images, trials=request.trials, memory=memory)

    runtime.core.trainer.cost = cost  # type: ignore[method-assign]
    images = [("r.png", noise_png(8)), ("b.png", noise_png(8))]
    dataset = datasets.create_from_labelled(OPEN_TENANT, "ds", images, ["r", "b"])
    server, channel = await serve(runtime)
    async with channel:
        yield Jobs(rpc.JobServiceStub(channel), runtime, f"datasets/{dataset.id}", server.port)
    await server.stop(grace=1)


RECIPE = {
    "objective": pb.OBJECTIVE_BALANCED_ACCURACY,
    "class_weighting": pb.CLASS_WEIGHTING_BALANCED,
    "scaling": pb.FEATURE_SCALING_STANDARDISE,
}


@pytest.mark.parametrize("kind", [pb.HEAD_KIND_LINEAR, pb.HEAD_KIND_AUTO])
async def test_the_recipe_options_reach_the_jobs_spec_and_its_stored_request(jobs, kind):
    spec = pb.TrainingSpec(dataset=jobs.dataset, head="h", backbone="mobilenet_v2", kind=kind, **RECIPE)
    created = await jobs.stub.CreateJob(api.CreateJobRequest(spec=spec))
    read = await jobs.stub.GetJob(api.GetJobRequest(name=created.name))
    for job in (created, read):
        assert {field: getattr(job.spec, field) for field in RECIPE} == RECIPE
    request = jobs.runtime.jobs.get(OPEN_TENANT, created.name.removeprefix("jobs/")).request
    assert {field: getattr(request, field).value for field in RECIPE} == {
        "objective": "balanced_accuracy",
        "class_weighting": "balanced",
        "scaling": "standardise",
    }


async def test_a_spec_without_recipe_options_shows_the_default_objective_and_leaves_the_rest_unspecified(jobs):
    spec = pb.TrainingSpec(dataset=jobs.dataset, head="h", backbone="mobilenet_v2", kind=pb.HEAD_KIND_PROTOTYPE)
    job = await jobs.stub.CreateJob(api.CreateJobRequest(spec=spec))
    assert job.spec.objective == pb.OBJECTIVE_ACCURACY
    assert job.spec.class_weighting == pb.CLASS_WEIGHTING_UNSPECIFIED
    assert job.spec.scaling == pb.FEATURE_SCALING_UNSPECIFIED


@pytest.mark.parametrize("door", ["grpc", "http"])
async def test_the_clis_recipe_options_reach_the_job_over_either_door(jobs, door, monkeypatch, capsys):
    """graft train --objective/--class-weighting/--scaling: the client's own conversions both ways."""
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    for name in ("GRAFT_URL", "GRAFT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    options = ["--objective", "balanced_accuracy", "--class-weighting", "none", "--scaling", "l2"]
    with contextlib.ExitStack() as stack:
        port = jobs.port if door == "grpc" else stack.enter_context(serve_http(jobs.runtime))
        url = f"{door}://127.0.0.1:{port}"
        args = ["--url", url, "train", jobs.dataset, "--head", "h", "--backbone", "mobilenet_v2", *options, "--no-wait"]
        assert await asyncio.to_thread(cli.main, args) == 0, capsys.readouterr().err
        name = capsys.readouterr().out.strip()
        with GrpcClient(f"127.0.0.1:{jobs.port}") if door == "grpc" else HttpClient(url) as client:
            spec = (await asyncio.to_thread(client.get_job, name)).spec
    assert (spec.objective, spec.class_weighting, spec.scaling) == ("balanced_accuracy", "none", "l2")
    request = jobs.runtime.jobs.get(OPEN_TENANT, name.removeprefix("jobs/")).request
    assert (request.objective.value, request.class_weighting.value, request.scaling.value) == (
        "balanced_accuracy",
        "none",
        "l2",
    )


@pytest.mark.parametrize(
    ("format", "text"),
    [(2, "EXPORT_FORMAT_TORCHSCRIPT (2) was removed"), (99, "one of EXPORT_FORMAT_SAFETENSORS, EXPORT_FORMAT_ONNX")],
)
async def test_a_removed_or_unknown_export_format_says_what_to_use(channel, format, text):
    request = api.ExportHeadRequest(head="h", format=format)
    with pytest.raises(grpc.RpcError) as error:
        [part async for part in rpc.HeadServiceStub(channel).ExportHead(request)]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in error.value.details() and "EXPORT_FORMAT_PT2" in error.value.details()


@pytest.mark.parametrize(
    "name",
    [
        "heads/h/versions/²",
        "heads/h/versions/100000000000000000000",
        "heads/h/versions/0",
        "heads/h/versions/1\n",
        "heads/h\x00/versions/1",
    ],
)
async def test_a_head_version_name_must_be_ascii_digits_within_32_bits(channel, name):
    await expect_invalid(
        rpc.HeadServiceStub(channel).DeleteHeadVersion,
        api.DeleteHeadVersionRequest(name=name),
        "heads/{head}/versions/{version}",
    )


@pytest.mark.parametrize("ref", ["h@0", "h@007", "h@2147483648"])
async def test_a_head_reference_to_no_version_there_can_be_is_invalid_argument(channel, ref):
    """As the HTTP door's schema says: versions are 1 to 2^31-1, written without a leading zero."""
    rule = "versions are 1 to 2147483647, with no leading zero"
    predict = rpc.PredictionServiceStub(channel).Predict
    await expect_invalid(predict, api.PredictRequest(images=[b"x"], heads=[ref]), rule)
    with pytest.raises(grpc.RpcError) as error:
        [part async for part in rpc.HeadServiceStub(channel).ExportHead(api.ExportHeadRequest(head=ref))]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and rule in error.value.details()


async def test_resource_names_with_control_characters_are_invalid_argument(channel):
    await expect_invalid(
        rpc.DatasetServiceStub(channel).GetDataset, api.GetDatasetRequest(name="datasets/a\x00b"), "resource name"
    )
    await expect_invalid(rpc.JobServiceStub(channel).GetJob, api.GetJobRequest(name="jobs/j\n"), "resource name")
    await expect_invalid(
        rpc.HeadServiceStub(channel).SetAlias,
        api.SetAliasRequest(name="heads/h", alias="p\x00", version=1),
        "alias 'p\\x00' is invalid",
    )
    await expect_invalid(
        rpc.PredictionServiceStub(channel).Predict,
        api.PredictRequest(images=[b"x"], heads=["h\x00"]),
        "head reference 'h\\x00'",
    )


@pytest.mark.parametrize("token", ["W" * 5000, "W1tbW1tbW1tbW1tbXV1dXV1dXV1dXV0", "WyJcdTAwMDAiXQ"])
async def test_a_malformed_page_token_is_invalid_argument(channel, token):
    """Too long, nested lists (json.loads would recurse), a NUL inside a key."""
    await expect_invalid(rpc.HeadServiceStub(channel).ListHeads, api.ListHeadsRequest(page_token=token), "page_token")


# -- what upload streams may hold, and for how long -----------------------------------------


async def test_uploads_in_progress_share_one_byte_budget_and_a_full_budget_says_when_to_retry(keyed):
    """An image's bytes are held from its message's arrival until the store has validated and stored it."""
    runtime, channel, me, _ = keyed
    datasets = rpc.DatasetServiceStub(channel)
    paused, big = asyncio.Event(), noise_png(26)  # ~2 kB of the 3 kB budget, held while the store takes it
    assert 2000 < len(big) < 3000
    storing, release = threading.Event(), threading.Event()

    def slow_store(_conn, _cursor, statement, *_):
        if statement.lstrip().upper().startswith("INSERT INTO BLOBS"):  # the store pins the slow stream's image
            storing.set()
            release.wait(timeout=10)

    async def slow_upload():
        yield header("slow")
        yield image("big.png", big, "a")
        await paused.wait()

    event.listen(runtime.core.db.engine, "before_cursor_execute", slow_store)
    try:
        slow = asyncio.ensure_future(datasets.CreateDataset(slow_upload(), metadata=me))
        while not storing.is_set():
            await asyncio.sleep(0.01)  # until the store is taking the slow stream's image (and it is held)
        second = [header("second"), image("also-big.png", noise_png(26), "a")]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await datasets.CreateDataset(iter(second), metadata=me)
    finally:
        release.set()
        event.remove(runtime.core.db.engine, "before_cursor_execute", slow_store)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
    assert "GRAFT_MAX_INFLIGHT_UPLOAD_BYTES" in error.value.details()
    assert ("retry-after", "5") in tuple(error.value.trailing_metadata())
    while runtime.uploads.held:
        await asyncio.sleep(0.01)  # stored: its bytes are given back while its stream still pauses
    paused.set()
    with pytest.raises(grpc.aio.AioRpcError):
        await slow  # one class only: refused, and its bytes are given back
    small = [header("fits"), image("a.png", noise_png(8), "a"), image("b.png", noise_png(8), "b")]
    dataset = await datasets.CreateDataset(iter(small), metadata=me)
    assert dataset.example_count == 2


async def test_an_upload_that_does_not_end_in_time_is_deadline_exceeded_and_stores_nothing(impatient):
    runtime, channel, me, _ = impatient
    datasets = rpc.DatasetServiceStub(channel)

    async def stalled():
        yield header("stalled")
        yield image("a.png", noise_png(8), "a")
        await asyncio.Event().wait()  # never ends

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await datasets.CreateDataset(stalled(), metadata=me)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "GRAFT_UPLOAD_TIMEOUT_S" in error.value.details()
    assert list((await datasets.ListDatasets(api.ListDatasetsRequest(), metadata=me)).datasets) == []


# -- nothing waits for the database on the event loop ----------------------------------------


@pytest.mark.parametrize(
    "method",
    ["ListDatasets", "GetDataset", "ListHeads", "GetHead", "GetHeadVersion", "DeleteHeadVersion", "ListJobs", "GetJob"],
)
async def test_the_event_loop_runs_while_a_call_waits_for_the_database(keyed, method):
    """Every statement waits until the loop itself releases it: a call that blocked the loop would time out."""
    runtime, channel, me, _ = keyed
    stub_and_request = {
        "ListDatasets": (rpc.DatasetServiceStub, api.ListDatasetsRequest()),
        "GetDataset": (rpc.DatasetServiceStub, api.GetDatasetRequest(name="datasets/ds_0")),
        "ListHeads": (rpc.HeadServiceStub, api.ListHeadsRequest()),
        "GetHead": (rpc.HeadServiceStub, api.GetHeadRequest(name="heads/h")),
        "GetHeadVersion": (rpc.HeadServiceStub, api.GetHeadVersionRequest(name="heads/h/versions/1")),
        "DeleteHeadVersion": (rpc.HeadServiceStub, api.DeleteHeadVersionRequest(name="heads/h/versions/1")),
        "ListJobs": (rpc.JobServiceStub, api.ListJobsRequest()),
        "GetJob": (rpc.JobServiceStub, api.GetJobRequest(name="jobs/job_0")),
    }
    stub, request = stub_and_request[method]
    entered, release, released = threading.Event(), threading.Event(), []

    def wait_for_the_loop(*_):
        entered.set()
        released.append(release.wait(timeout=5))

    event.listen(runtime.core.db.engine, "before_cursor_execute", wait_for_the_loop)
    try:
        call = asyncio.ensure_future(getattr(stub(channel), method)(request, metadata=me))
        while not entered.is_set():
            await asyncio.sleep(0.01)  # the loop gets here only while it is free
        release.set()
        await asyncio.gather(call, return_exceptions=True)  # the answer itself does not matter here
    finally:
        event.remove(runtime.core.db.engine, "before_cursor_execute", wait_for_the_loop)
    assert released and all(released), "a database statement ran on the event loop"


# -- revoked keys, readiness, internal errors -----------------------------------------------


async def test_a_revoked_key_ends_an_open_prediction_stream(keyed):
    runtime, channel, me, key_id = keyed
    requests: asyncio.Queue = asyncio.Queue()

    async def stream():
        while (message := await requests.get()) is not None:
            yield message

    call = rpc.PredictionServiceStub(channel).StreamPredict(stream(), metadata=me)
    await requests.put(api.StreamPredictRequest(request_id="r1", image=b"x", heads=["nobody"]))
    first = await call.read()
    assert first.request_id == "r1" and first.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    await asyncio.to_thread(runtime.tenants.revoke_key, key_id)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(call.read(), 60)  # the stream stays open on the client's side: the server ends it
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_is_not_serving_while_the_registry_cannot_be_reached(tmp_path):
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="open", backbones=[]))
    runtime.probe_interval_s = 0.05
    await runtime.start()
    server, channel = await serve(runtime)
    health = health_pb2_grpc.HealthStub(channel)

    async def status_becomes(expected) -> bool:
        for _ in range(300):
            if (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == expected:
                return True
            await asyncio.sleep(0.05)
        return False

    def unreachable(*_):
        raise ConnectionError("registry is down (test)")

    try:
        event.listen(runtime.core.db.engine, "before_cursor_execute", unreachable)
        assert await status_becomes(health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not runtime.registry_reachable
        event.remove(runtime.core.db.engine, "before_cursor_execute", unreachable)
        assert await status_becomes(health_pb2.HealthCheckResponse.SERVING)
    finally:
        await channel.close()
        await server.stop(grace=1)
        await runtime.stop()


async def test_an_unexpected_error_is_internal_with_a_reference_and_no_details(keyed, caplog):
    runtime, channel, me, _ = keyed
    secret_text = "s3cret connection string"

    def broken(_conn, _cursor, statement, *_):
        if "datasets" in statement:
            raise RuntimeError(secret_text)

    event.listen(runtime.core.db.engine, "before_cursor_execute", broken)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await rpc.DatasetServiceStub(channel).ListDatasets(api.ListDatasetsRequest(), metadata=me)
    finally:
        event.remove(runtime.core.db.engine, "before_cursor_execute", broken)
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert error.value.details().startswith("internal error (reference ")
    assert secret_text not in error.value.details()
    reference = error.value.details().removeprefix("internal error (reference ").rstrip(")")
    assert any(reference in record.getMessage() for record in caplog.records)


async def test_in_open_mode_the_grpc_door_listens_on_loopback_only(tmp_path):
    open_mode = Runtime.open(Settings(data_dir=tmp_path / "open", auth="open", backbones=[]))
    with_keys = Runtime.open(Settings(data_dir=tmp_path / "keys", auth="keys", backbones=[]))
    assert default_host(open_mode) == "127.0.0.1"
    assert default_host(with_keys) == "0.0.0.0"


# -- uploads never hold the threads that authentication, registry calls and readiness need -


async def test_idle_upload_streams_do_not_starve_other_tenants_calls_or_the_readiness_probe(tmp_path):
    """As many upload streams as the store pool has threads, each stopped after its header: another tenant
    still authenticates and lists its datasets over both doors, and readiness still follows the registry.

    The 5 s bounds are liveness bounds (each answer takes milliseconds): before, every call hung."""
    settings = Settings(data_dir=tmp_path, auth="keys", backbones=[])
    runtime = Runtime.open(settings)
    runtime.probe_interval_s = 0.05
    for tenant in ("hostile", "good"):
        runtime.tenants.create_tenant(tenant)
    hostile = [("authorization", f"Bearer {runtime.tenants.create_key('hostile').secret}")]
    good_key = runtime.tenants.create_key("good").secret
    await runtime.start()
    server, channel = await serve(runtime)
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(settings, lambda: runtime)), base_url="http://graft"
    )
    stop = asyncio.Event()

    async def header_then_nothing():
        yield header("idle")
        await stop.wait()

    datasets = rpc.DatasetServiceStub(channel)
    idle = [
        asyncio.ensure_future(datasets.CreateDataset(header_then_nothing(), metadata=hostile))
        for _ in range(settings.store_threads)
    ]
    health = health_pb2_grpc.HealthStub(channel)

    def unreachable(*_):
        raise ConnectionError("registry is down (test)")

    try:
        await asyncio.sleep(1.0)  # every stream's header has reached the server
        good = [("authorization", f"Bearer {good_key}")]
        listed = await asyncio.wait_for(datasets.ListDatasets(api.ListDatasetsRequest(), metadata=good), 5)
        assert list(listed.datasets) == []
        response = await asyncio.wait_for(http.get("/v1/datasets", headers={"Authorization": f"Bearer {good_key}"}), 5)
        assert response.status_code == 200, response.text
        event.listen(runtime.core.db.engine, "before_cursor_execute", unreachable)
        try:
            async with asyncio.timeout(5):
                while (
                    await health.Check(health_pb2.HealthCheckRequest())
                ).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                    await asyncio.sleep(0.05)
        finally:
            event.remove(runtime.core.db.engine, "before_cursor_execute", unreachable)
    finally:
        stop.set()
        await asyncio.gather(*idle, return_exceptions=True)
        await http.aclose()
        await channel.close()
        await server.stop(grace=1)
        await runtime.stop()
