"""Job watches over both doors in-process (the real runtime, gRPC server and HTTP app; no backbone, jobs stay queued):
a tenant's open watches are bounded, and their polling never waits behind the default thread pool."""

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from service.config import Settings
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.runtime import Runtime
from service.training import TrainRequest

pytestmark = pytest.mark.anyio


class Doors:
    """One runtime (never started: a queued job stays queued) behind a gRPC server and the HTTP app."""

    def __init__(self, runtime: Runtime, channel: grpc.aio.Channel, http: httpx.AsyncClient) -> None:
        self.runtime, self.channel, self.http = runtime, channel, http
        self.started: list[asyncio.Event] = []

    def key(self, tenant: str) -> str:
        self.runtime.tenants.create_tenant(tenant)
        return self.runtime.tenants.create_key(tenant).secret

    def queued_job(self, tenant: str) -> str:
        return self.runtime.jobs.store.create(tenant, TrainRequest(dataset_id="ds_x", head_name="h")).id

    async def grpc_watch(self, key: str, job: str) -> grpc.aio.UnaryStreamCall:
        """An open WatchJob whose first message (the job now) has arrived."""
        call = rpc.JobServiceStub(self.channel).WatchJob(
            api.WatchJobRequest(name=f"jobs/{job}"), metadata=[("authorization", f"Bearer {key}")]
        )
        await asyncio.wait_for(call.read(), 5)
        return call

    async def http_watch(self, key: str, job: str) -> tuple[asyncio.Future[httpx.Response], asyncio.Event]:
        """A watch request and an event set once its answer started (200: the stream is open)."""
        started = asyncio.Event()
        self.started.append(started)
        response = asyncio.ensure_future(
            self.http.get(f"/v1/jobs/{job}:watch", headers={"Authorization": f"Bearer {key}"})
        )
        return response, started


@pytest.fixture
async def doors(tmp_path) -> AsyncIterator[Doors]:
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="keys", backbones=[], max_watches_per_tenant=2))
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    app = create_app(runtime.settings, lambda: runtime)
    doors: Doors

    async def observed(scope, receive, send):
        started = doors.started[-1] if doors.started else asyncio.Event()

        async def spy(message):
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        await app(scope, receive, spy)

    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=observed), base_url="http://graft") as http,
    ):
        doors = Doors(runtime, channel, http)
        yield doors
    await server.stop(grace=1)


async def test_a_tenant_may_hold_only_its_limit_of_job_watches_over_both_doors(doors):
    """GRAFT_MAX_WATCHES_PER_TENANT is 2 here: one watch over each door fills it; a third is refused over either
    door, another tenant is not, and a watch that ends frees its place."""
    hostile, good = doors.key("hostile"), doors.key("good")
    job = doors.queued_job("hostile")
    over_grpc = await doors.grpc_watch(hostile, job)
    over_http, started = await doors.http_watch(hostile, job)
    await asyncio.wait_for(started.wait(), 5)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await doors.grpc_watch(hostile, job)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
        assert "GRAFT_MAX_WATCHES_PER_TENANT" in error.value.details()
        refused, _ = await doors.http_watch(hostile, job)
        response = await asyncio.wait_for(refused, 5)
        assert response.status_code == 429, response.text
        assert "GRAFT_MAX_WATCHES_PER_TENANT" in response.json()["message"] and "Retry-After" in response.headers
        other = await doors.grpc_watch(good, doors.queued_job("good"))  # the limit is per tenant
        other.cancel()
        over_grpc.cancel()  # the client leaves: its place is free again
        async with asyncio.timeout(5):
            while True:
                try:
                    again = await doors.grpc_watch(hostile, job)
                    break
                except grpc.aio.AioRpcError as still:
                    assert still.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    await asyncio.sleep(0.05)
        again.cancel()
    finally:
        over_http.cancel()
        await asyncio.gather(over_http, return_exceptions=True)


async def test_job_watches_answer_while_the_default_thread_pool_is_busy(doors):
    """Prediction head lookups and image decoding share the loop's default pool; a watch's database reads must
    not wait behind them (nor they behind hundreds of watches). 5 s is a liveness bound: it takes milliseconds."""
    key = doors.key("acme")
    job = doors.queued_job("acme")
    release = threading.Event()
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(None, release.wait, 30) for _ in range(64)]  # more than the pool has threads
    try:
        watch = await doors.grpc_watch(key, job)  # its first read: within 5 s
        watch.cancel()
    finally:
        release.set()
        await asyncio.gather(*busy)
