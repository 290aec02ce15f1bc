"""Non-finite numbers (1e999, inf, nan) in a training spec are refused at both doors, never stored."""

import math

import grpc
import httpx
import pytest
from pydantic import ValidationError

from service.config import Settings
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.resources import TrainingSpec
from service.runtime import Runtime
from service.store.db import JobRow
from service.training import TrainRequest

pytestmark = pytest.mark.anyio


@pytest.fixture
def runtime(tmp_path) -> Runtime:
    return Runtime.open(Settings(data_dir=tmp_path, auth="open", backbones=[]))


def stored_jobs(runtime: Runtime) -> int:
    with runtime.core.db.session() as session:
        return session.query(JobRow).count()


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_non_finite_number_in_a_training_spec_is_a_validation_error(value):
    with pytest.raises(ValidationError, match="finite"):
        TrainingSpec.model_validate({"dataset": "ds_1", "head": "h", "backbone": "auto", "latency_budget_ms": value})
    with pytest.raises(ValidationError, match="finite"):
        TrainRequest(dataset_id="ds_1", head_name="h", backbone="auto", latency_budget_ms=value)


async def test_latency_budget_1e999_over_http_is_refused_as_invalid_not_stored(runtime):
    app = create_app(runtime.settings, lambda: runtime)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    body = b'{"dataset": "datasets/ds_1", "head": "h", "backbone": "auto", "latency_budget_ms": 1e999}'
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        response = await client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert "finite" in response.text
    assert stored_jobs(runtime) == 0


@pytest.mark.parametrize("value", [math.inf, math.nan])
async def test_a_non_finite_latency_budget_over_grpc_is_invalid_argument_not_stored(runtime, value):
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            spec = pb.TrainingSpec(dataset="datasets/ds_1", head="h", backbone="auto", latency_budget_ms=value)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await rpc.JobServiceStub(channel).CreateJob(api.CreateJobRequest(spec=spec))
    finally:
        await server.stop(grace=1)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert "finite" in error.value.details()
    assert stored_jobs(runtime) == 0
