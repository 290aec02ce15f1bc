"""Creating calls run once per idempotency key, over both doors, against real servers.

The HTTP door runs in-process (ASGI) or under uvicorn behind a proxy that loses the first answer; the gRPC door
is a real grpc.aio server. Jobs are created and never run (the runtime is not started); the trainer's cost check
reads the dataset only (no backbone is loaded).
"""

import asyncio
import contextlib
import io
import socket
import threading
from datetime import timedelta

import grpc
import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from client.models import TrainingSpec as ClientSpec
from client.retry import RetryPolicy
from harness.inprocess import serve_http
from service.config import Settings
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.runtime import Runtime
from service.store.db import ApiKeyRow, DatasetRow, IdempotencyKeyRow, JobRow, utcnow
from service.training import FeatureMemory, TrainingCost

pytestmark = pytest.mark.anyio
ADMIN_KEY = "0123456789abcdef" * 4


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [("a.png", png((255, 0, 0))), ("b.png", png((0, 255, 0)))]


@pytest.fixture
def runtime(tmp_path) -> Runtime:
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="keys", backbones=[], admin_key=ADMIN_KEY))
    datasets = runtime.core.datasets

    def cost(tenant, request):  # what the trainer checks, less the backbone (none is loaded here)
        images = datasets.get(tenant, request.dataset_id).num_examples
        memory = FeatureMemory(backbone="mobilenet_v2", split="pooled", elements=1280, bytes=images * 1280 * 12)
        return TrainingCost(epochs=request.epochs, images=images, trials=request.trials, memory=memory)

    runtime.core.trainer.cost = cost  # type: ignore[method-assign]
    return runtime


def tenant(runtime: Runtime, name: str) -> tuple[str, str]:
    """A tenant with a key and a dataset: (key secret, dataset id)."""
    runtime.tenants.create_tenant(name)
    secret = runtime.tenants.create_key(name).secret
    dataset = runtime.core.datasets.create_from_labelled(name, "ds", IMAGES, ["red", "green"])
    return secret, dataset.id


def count(runtime: Runtime, row: type, **where: str) -> int:
    with runtime.core.db.session() as session:
        return session.scalar(
            select(func.count()).select_from(row).where(*(getattr(row, k) == v for k, v in where.items()))
        )


@contextlib.asynccontextmanager
async def http(runtime: Runtime):
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        yield client


@contextlib.asynccontextmanager
async def grpc_jobs(runtime: Runtime):
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield rpc.JobServiceStub(channel), rpc.DatasetServiceStub(channel)
    finally:
        await server.stop(grace=1)


def job_body(dataset: str, head: str = "h") -> dict:
    return {"dataset": f"datasets/{dataset}", "head": head, "backbone": "mobilenet_v2"}


async def test_a_create_job_repeated_with_the_same_key_creates_one_job_over_either_door(runtime):
    secret, dataset = tenant(runtime, "acme")
    headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "try-1"}
    async with http(runtime) as client:
        answers = [await client.post("/v1/jobs", json=job_body(dataset), headers=headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [202] * 3, answers[0].text
    assert len({a.json()["name"] for a in answers}) == 1
    assert count(runtime, JobRow) == 1

    metadata = (("authorization", f"Bearer {secret}"), ("idempotency-key", "try-2"))
    spec = pb.TrainingSpec(dataset=f"datasets/{dataset}", head="h", backbone="mobilenet_v2")
    async with grpc_jobs(runtime) as (jobs, _):
        first = await jobs.CreateJob(api.CreateJobRequest(spec=spec), metadata=metadata)
        again = await jobs.CreateJob(api.CreateJobRequest(spec=spec), metadata=metadata)
        # The key is the tenant's, whichever door: HTTP's try-1 over gRPC answers HTTP's job.
        other_door = await jobs.CreateJob(
            api.CreateJobRequest(spec=spec), metadata=(metadata[0], ("idempotency-key", "try-1"))
        )
    assert first.name == again.name != answers[0].json()["name"]
    assert other_door.name == answers[0].json()["name"]
    assert count(runtime, JobRow) == 2


async def test_another_tenant_using_the_same_key_string_gets_its_own_job(runtime):
    acme, acme_data = tenant(runtime, "acme")
    other, other_data = tenant(runtime, "other")
    async with http(runtime) as client:
        mine = await client.post(
            "/v1/jobs", json=job_body(acme_data), headers={"Authorization": f"Bearer {acme}", "Idempotency-Key": "k"}
        )
        theirs = await client.post(
            "/v1/jobs",
            json=job_body(other_data, "g"),
            headers={"Authorization": f"Bearer {other}", "Idempotency-Key": "k"},
        )
    assert mine.status_code == theirs.status_code == 202, theirs.text
    assert mine.json()["name"] != theirs.json()["name"]
    assert theirs.json()["spec"]["head"] == "g"  # not acme's job, nor a refusal for acme's other request
    assert count(runtime, JobRow, tenant="acme") == count(runtime, JobRow, tenant="other") == 1


async def test_a_key_reused_for_another_request_is_refused_and_a_failed_call_frees_its_key(runtime):
    secret, dataset = tenant(runtime, "acme")
    headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "k"}
    async with http(runtime) as client:
        missing = await client.post("/v1/jobs", json=job_body("ds_missing"), headers=headers)
        assert missing.status_code == 404  # failed: the key is free again for the corrected request
        created = await client.post("/v1/jobs", json=job_body(dataset), headers=headers)
        assert created.status_code == 202, created.text
        reused = await client.post("/v1/jobs", json=job_body(dataset, "other-head"), headers=headers)
    assert reused.status_code == 409 and reused.json()["code"] == "failed_precondition", reused.text
    assert count(runtime, JobRow) == 1

    metadata = (("authorization", f"Bearer {secret}"), ("idempotency-key", "k"))
    spec = pb.TrainingSpec(dataset=f"datasets/{dataset}", head="other-head", backbone="mobilenet_v2")
    async with grpc_jobs(runtime) as (jobs, _):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await jobs.CreateJob(api.CreateJobRequest(spec=spec), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_dataset_upload_repeated_with_its_key_makes_one_dataset_over_either_door(runtime):
    secret, _ = tenant(runtime, "acme")
    files = [("files", (name, data, "image/png")) for name, data in IMAGES]
    form = {"display_name": "pets", "labels": ["red", "green"]}
    headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "upload-1"}
    async with http(runtime) as client:
        answers = [await client.post("/v1/datasets", data=form, files=files, headers=headers) for _ in range(2)]
    assert [a.status_code for a in answers] == [201, 201], answers[0].text
    assert answers[0].json()["name"] == answers[1].json()["name"]

    def stream():
        yield api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name="birds"))
        for (name, data), label in zip(IMAGES, ["red", "green"], strict=True):
            yield api.CreateDatasetRequest(image=api.CreateDatasetRequest.Image(file_name=name, data=data, label=label))

    metadata = (("authorization", f"Bearer {secret}"), ("idempotency-key", "upload-2"))
    async with grpc_jobs(runtime) as (_, datasets):
        first = await datasets.CreateDataset(stream(), metadata=metadata)
        again = await datasets.CreateDataset(stream(), metadata=metadata)
    assert first.name == again.name
    assert count(runtime, DatasetRow, tenant="acme") == 3  # the fixture's, pets and birds


async def test_the_admins_create_key_repeated_gives_the_same_key_and_keeps_no_secret_in_clear(runtime):
    runtime.tenants.create_tenant("acme")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Idempotency-Key": "new-key-1"}
    async with http(runtime) as client:
        answers = [await client.post("/v1/admin/tenants/acme/keys", headers=headers) for _ in range(2)]
        fresh = await client.post("/v1/admin/tenants/acme/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert [a.status_code for a in answers] == [201, 201], answers[0].text
    assert answers[0].json() == answers[1].json()
    assert fresh.json()["key_id"] != answers[0].json()["key_id"]
    assert count(runtime, ApiKeyRow, tenant="acme") == 2
    assert runtime.tenants.authenticate(f"Bearer {answers[1].json()['secret']}") == "acme"
    with runtime.core.db.session() as session:
        stored = session.scalars(select(IdempotencyKeyRow)).one()
    assert answers[0].json()["secret"] not in stored.result and "new-key-1" not in stored.key_sha256


async def test_expired_keys_are_collected_and_each_tenant_keeps_a_bounded_number(runtime):
    requests = runtime.requests
    requests.per_tenant = 3
    for i in range(5):
        assert requests.claim("acme", f"k{i}", "create_job", "f") is None
        requests.complete("acme", f"k{i}", f"jobs/{i}")
    assert count(runtime, IdempotencyKeyRow, tenant="acme") == 3  # the oldest went first
    assert requests.claim("acme", "k4", "create_job", "f") == "jobs/4"
    assert requests.claim("other", "k4", "create_job", "g") is None  # another tenant's k4 is another key
    with runtime.core.db.session() as session:
        for row in session.scalars(select(IdempotencyKeyRow).where(IdempotencyKeyRow.tenant == "acme")):
            row.expires_at = utcnow() - timedelta(seconds=1)
    assert requests.collect_expired() == 3
    assert count(runtime, IdempotencyKeyRow) == 1


# -- the client, its retries, a real server ---------------------------------------------------------------------


class LosesFirstAnswer:
    """A TCP proxy in front of a real HTTP server that forwards each request (``Connection: close``) but drops the
    connection instead of relaying the answer to the first request whose line starts with ``lose``: the server ran
    it, the client never hears so, as behind a load balancer whose upstream connection reset."""

    def __init__(self, upstream_port: int, lose: bytes) -> None:
        self.upstream_port = upstream_port
        self.lose = lose
        self.lost = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
            length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
                up.sendall(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body)
                answer = b""
                while chunk := up.recv(65536):
                    answer += chunk
            if lines[0].startswith(self.lose) and not self.lost:
                self.lost += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return  # reset: the answer is lost
            conn.sendall(answer)

    def close(self) -> None:
        self.listener.close()


def test_the_http_client_retries_a_create_job_whose_answer_was_lost_and_one_job_is_made(runtime):
    secret, dataset = tenant(runtime, "acme")
    spec = ClientSpec(dataset=f"datasets/{dataset}", head="h", backbone="mobilenet_v2")
    with serve_http(runtime) as port:
        proxy = LosesFirstAnswer(port, lose=b"POST /v1/jobs")
        try:
            with HttpClient(f"http://127.0.0.1:{proxy.port}", secret, retry=RetryPolicy(base_delay_s=0.01)) as client:
                job = client.create_job(spec)
                assert proxy.lost == 1  # the first try ran on the server and its answer was lost
                # Without a key the same loss is not retried: the call may have run.
                proxy.lost = 0
                with pytest.raises(Exception, match="may have run"):
                    client._call("POST", f"/v1/{job.name}:cancel")
        finally:
            proxy.close()
    assert count(runtime, JobRow) == 1
    assert runtime.jobs.get("acme", job.name.removeprefix("jobs/")).state.value == "cancelled"  # the lost try ran


def test_the_client_retries_what_may_have_run_only_when_the_call_is_safe():
    from client.errors import Unavailable

    tries: list[int] = []

    def broke() -> None:
        tries.append(1)
        raise Unavailable("connection reset")  # may have run

    policy = RetryPolicy(attempts=3, base_delay_s=0)
    with pytest.raises(Unavailable):
        policy.call(broke, safe=False)
    assert len(tries) == 1
    with pytest.raises(Unavailable):
        policy.call(broke, safe=True)
    assert len(tries) == 4

    def refused() -> None:
        tries.append(1)
        raise Unavailable("connection refused", may_have_run=False)

    with pytest.raises(Unavailable):
        policy.call(refused, safe=False)  # never ran: retried even though unsafe
    assert len(tries) == 7


class AnswerLost(grpc.aio.ServerInterceptor):
    """The first CreateJob runs, then its caller gets UNAVAILABLE (as if the connection reset after the commit)."""

    def __init__(self) -> None:
        self.lost = 0

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if not details.method.endswith("/CreateJob"):
            return handler

        async def lose_first(request, context):
            answer = await handler.unary_unary(request, context)
            if not self.lost:
                self.lost += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            return answer

        return handler._replace(unary_unary=lose_first)


async def test_the_grpc_client_retries_a_create_job_whose_answer_was_lost_and_one_job_is_made(runtime, monkeypatch):
    secret, dataset = tenant(runtime, "acme")
    lost = AnswerLost()
    real_server = grpc.aio.server

    def with_loss(*args, interceptors=(), **kwargs):
        return real_server(*args, interceptors=[*interceptors, lost], **kwargs)

    monkeypatch.setattr(grpc.aio, "server", with_loss)
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    spec = ClientSpec(dataset=f"datasets/{dataset}", head="h", backbone="mobilenet_v2")
    try:
        with GrpcClient(f"127.0.0.1:{server.port}", secret, retry=RetryPolicy(base_delay_s=0.01)) as client:
            job = await asyncio.to_thread(client.create_job, spec)
    finally:
        await server.stop(grace=1)
    assert lost.lost == 1
    assert count(runtime, JobRow) == 1
    assert job.name.startswith("jobs/")
