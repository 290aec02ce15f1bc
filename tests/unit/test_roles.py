"""Replica roles (GRAFT_ROLE): serving replicas never train, training replicas never take predictions.

Jobs run on a real backbone and real images; the doors are the real HTTP app and a real gRPC server on a
loopback port. Replicas are runners (or runtimes) sharing one database, as replicas share the registry.
"""

import asyncio
import threading
from datetime import timedelta
from types import SimpleNamespace

import anyio
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import update
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from adapters.search_space import SearchSpace
from harness.sample_data import fashion_mnist_pngs
from service.app import Graft, not_ready_reason
from service.config import Settings
from service.core import Core
from service.errors import Unavailable
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.http.errors import NotReadyBody
from service.jobs import JobInfo, JobRunner, JobState
from service.quotas import Quotas
from service.runtime import Runtime
from service.store.db import JobRow, utcnow
from service.training import Trainer, TrainRequest

pytestmark = pytest.mark.anyio

TENANT = "acme"
ONE_TRIAL = SearchSpace(lr=[1.0], weight_decay=[1e-3])
TWO_TRIALS = SearchSpace(lr=[1.0], weight_decay=[1e-3, 1e-2])  # the cancel flag is checked between trials
POLL_S = 0.5  # service/jobs/runner.py: how often a scheduler looks for queued jobs


# -- serving replicas never train ------------------------------------------------------------------


@pytest.fixture
def core(tmp_path, make_core) -> Core:
    return make_core(tmp_path)


@pytest.fixture(scope="module")
def images():
    files = fashion_mnist_pngs("train", per_class=6, seed=5)
    return [(f"{i}.png", data, label) for i, (data, label) in enumerate(files) if label in ("trouser", "bag")]


@pytest.fixture
def dataset(core, images):
    return core.datasets.create(TENANT, "two-classes", images)


def make_runner(core: Core, role: str, trainer: Trainer | None = None, **settings) -> tuple[JobRunner, list]:
    """A replica of ``role`` on ``core``'s database, and the jobs it finished."""
    changed = core.settings.model_copy(update={"role": role, **settings})
    finished: list[JobInfo] = []
    runner = JobRunner(core.db, trainer or core.trainer, changed, Quotas(changed), on_finished=finished.append)
    return runner, finished


def request(dataset, head_name: str, search: SearchSpace = ONE_TRIAL) -> TrainRequest:
    return TrainRequest(dataset_id=dataset.id, head_name=head_name, search=search)


def job_row(core: Core, job_id: str) -> JobRow:
    with core.db.session() as session:
        return session.get_one(JobRow, job_id)


async def until_done(runner: JobRunner, job_id: str) -> JobInfo:
    with anyio.fail_after(300):
        return [update async for update in runner.watch(TENANT, job_id)][-1]


class GatedTrainer(Trainer):
    """The real trainer, except that a run holds at its first progress report until the gate opens."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(
            trainer.backbones, trainer.datasets, trainer.extractor, trainer.heads, trainer.default_backbone
        )
        self.started = threading.Event()
        self.gate = threading.Event()
        self.cancelled = lambda: False

    def train(self, tenant, request, *, progress=None, cancelled=None, **kwargs):
        self.cancelled = cancelled

        def held(event):
            self.started.set()
            self.gate.wait(timeout=60)
            progress(event)

        return super().train(tenant, request, progress=held, cancelled=cancelled, **kwargs)


async def test_a_serving_replica_never_claims_a_job(core, dataset):
    serving, served = make_runner(core, "serve")
    await serving.start()
    training, trained = make_runner(core, "train")
    try:
        job = await serving.submit(TENANT, request(dataset, "trained-elsewhere"))
        await anyio.sleep(4 * POLL_S)  # the serving replica's scheduler looked several times, and was woken
        row = job_row(core, job.id)
        assert (row.state, row.worker, row.attempts) == ("queued", None, 0)
        assert serving.get(TENANT, job.id).state is JobState.QUEUED

        await training.start()
        final = await until_done(serving, job.id)  # watched from the serving replica, through the database
    finally:
        await serving.stop()
        await training.stop()
    assert final.state is JobState.SUCCEEDED and final.head_version == 1
    assert served == [] and [job.id for job in trained] == [final.id]
    assert core.heads.get(TENANT, "trained-elsewhere").versions[0].version == 1


async def test_a_serving_replica_cancels_and_watches_a_job_running_on_a_training_replica(core, dataset):
    trainer = GatedTrainer(core.trainer)
    training, _ = make_runner(core, "train", trainer, job_lease_s=3.0)  # renews every second
    serving, _ = make_runner(core, "serve")
    await training.start()
    await serving.start()
    try:
        job = await serving.submit(TENANT, request(dataset, "cancelled-elsewhere", TWO_TRIALS))
        assert await anyio.to_thread.run_sync(trainer.started.wait, 60), "the training replica never ran it"
        assert (await serving.cancel(TENANT, job.id)).state is JobState.RUNNING  # until the trainer notices
        with anyio.fail_after(30):
            while not trainer.cancelled():  # the training replica's heartbeat picked the cancel up
                await anyio.sleep(0.05)
        trainer.gate.set()
        final = await until_done(serving, job.id)
    finally:
        trainer.gate.set()
        await serving.stop()
        await training.stop()
    assert final.state is JobState.CANCELLED


async def test_a_serving_replica_requeues_an_expired_lease_but_leaves_the_job_to_a_training_replica(core, dataset):
    """Requeueing is kept on serving replicas: a job whose training replica died goes back to the queue (or fails
    after its last attempt) even while no training replica is up; it is still never run there."""
    idle, _ = make_runner(core, "serve")  # not started: it only submits
    orphan = await idle.submit(TENANT, request(dataset, "orphan"))
    with core.db.session() as session:  # as a training replica that died mid-run left it
        session.execute(
            update(JobRow)
            .where(JobRow.id == orphan.id)
            .values(state="running", worker="gone:1:dead", attempts=1, lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    serving, served = make_runner(core, "serve")
    await serving.start()
    try:
        with anyio.fail_after(30):
            while job_row(core, orphan.id).state != "queued":
                await anyio.sleep(0.05)
        await anyio.sleep(4 * POLL_S)
        row = job_row(core, orphan.id)
        assert (row.state, row.worker, row.attempts) == ("queued", None, 1)
    finally:
        await serving.stop()
    assert served == []


# -- training replicas never take predictions ------------------------------------------------------


@pytest.fixture
def trainer_runtime(tmp_path) -> Runtime:
    """A training replica's runtime, keys required, with one tenant (no backbone: predictions never get that far)."""
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="keys", backbones=[], role="train"))
    runtime.tenants.create_tenant(TENANT)
    return runtime


@pytest.fixture
def key(trainer_runtime) -> str:
    return trainer_runtime.tenants.create_key(TENANT).secret


def assert_refused_for_training(message: str) -> None:
    assert "only trains" in message and "serving replica" in message and "GRAFT_ROLE=train" in message


async def test_a_training_replica_refuses_predictions_over_both_doors(trainer_runtime, key):
    bearer = {"Authorization": f"Bearer {key}"}
    app = create_app(trainer_runtime.settings, lambda: trainer_runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://graft") as client:
        for path in ("/v1/predict", "/v1/predict:upload"):
            response = await client.post(path, content=b"{}", headers={**bearer, "Content-Type": "application/json"})
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "unavailable"
            assert_refused_for_training(response.json()["message"])
        assert (await client.get("/v1/jobs", headers=bearer)).status_code == 200  # the rest of the API works

    server = await start_grpc_server(trainer_runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            me = [("authorization", f"Bearer {key}")]
            predictions = rpc.PredictionServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await predictions.Predict(api.PredictRequest(images=[b"x"], heads=["h"]), metadata=me)
            assert unary.value.code() == grpc.StatusCode.UNAVAILABLE
            assert_refused_for_training(unary.value.details())

            never_read = asyncio.Event()

            async def requests():
                yield api.StreamPredictRequest(request_id="r1", image=b"x", heads=["h"])
                await never_read.wait()  # the stream stays open on the client's side: the server ends it

            stream = predictions.StreamPredict(requests(), metadata=me)
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await asyncio.wait_for(stream.read(), 30)
            assert streamed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert_refused_for_training(streamed.value.details())
            never_read.set()

            await rpc.JobServiceStub(channel).ListJobs(api.ListJobsRequest(), metadata=me)  # the rest works
    finally:
        await server.stop(grace=1)

    with pytest.raises(Unavailable) as core_path:  # the one place both doors reach
        await trainer_runtime.predictor.predict(TENANT, [b"x"], ["h"])
    assert_refused_for_training(core_path.value.message)


async def test_a_training_replica_is_alive_but_not_ready(trainer_runtime):
    assert trainer_runtime.accepting and not trainer_runtime.ready
    assert_refused_for_training(trainer_runtime.not_ready_reason or "")

    # gRPC health: NOT_SERVING overall and for predictions; the services it does answer are SERVING.
    server = await start_grpc_server(trainer_runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str):
                return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

            not_serving, serving = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
            assert await status("") == not_serving
            assert await status("graft.v1.PredictionService") == not_serving
            assert await status("graft.v1.JobService") == serving
    finally:
        await server.stop(grace=1)

    # HTTP: the worker's readiness is False, and /readyz says why (as Graft registers it, in front of BentoML's
    # own health routes, stood in for here by a Starlette app that answers both); /livez is untouched.
    assert Graft.inner.__is_ready__(SimpleNamespace(grpc=server, runtime=trainer_runtime)) is False
    assert (NotReadyBody, {"reason": not_ready_reason}) in Graft.middlewares
    assert not_ready_reason() is None  # no BentoML service instance here: BentoML's own answer stands
    assert not hasattr(Graft.inner, "__is_alive__")  # BentoML's /livez answers 200 while the process runs

    async def ok(_):
        return PlainTextResponse("\n")

    bentoml_health = Starlette(routes=[Route("/readyz", ok), Route("/livez", ok)])
    app = NotReadyBody(bentoml_health, reason=lambda: trainer_runtime.not_ready_reason)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://graft") as client:
        readyz = await client.get("/readyz")
        assert readyz.status_code == 503 and readyz.json()["code"] == "unavailable"
        assert_refused_for_training(readyz.json()["message"])
        assert (await client.get("/livez")).status_code == 200


@pytest.mark.parametrize("role", ["both", "serve"])
async def test_serving_roles_are_ready_and_predict(tmp_path, role):
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="open", backbones=[], role=role))
    assert runtime.ready and runtime.not_ready_reason is None
    runtime.predictor.check_serving()
    assert Settings(data_dir=tmp_path).role == "both"  # the embedded default: today's behaviour
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "graft.v1.PredictionService", "graft.v1.JobService"):
                response = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert response.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=1)
