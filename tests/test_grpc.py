"""The gRPC door in-process: a real grpc.aio server on a free loopback port, without a backbone.

The end-to-end flows (upload, train, predict, export) run against `bentoml serve`
in test_grpc_e2e.py; these check the door's own limits cheaply, with real parts
and no backbone loaded.
"""

import grpc
import pytest

from service.auth import Tenants
from service.config import Settings
from service.core import Core
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.jobs import JobRunner
from service.runtime import Runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
async def channel(tmp_path):
    settings = Settings(data_dir=tmp_path, auth="open", max_upload_bytes=1000)
    core = Core.open(settings, backbones=[])
    predictor = Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 20), settings)
    runtime = Runtime(core, predictor, JobRunner(core.db, core.trainer), Tenants(core.db, settings))
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    await server.stop(grace=1)


async def test_an_unknown_backbone_is_not_found(channel):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await rpc.BackboneServiceStub(channel).GetBackbone(api.GetBackboneRequest(name="backbones/nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in error.value.details()


async def test_an_upload_is_refused_at_the_file_that_crosses_the_byte_limit(channel):
    """Checked as messages arrive, before the images are validated: the rest is never held."""

    async def upload():
        yield api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name="big"))
        for i in range(50):
            image = api.CreateDatasetRequest.Image(file_name=f"{i}.png", label="a", data=b"x" * 600)
            yield api.CreateDatasetRequest(image=image)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await rpc.DatasetServiceStub(channel).CreateDataset(upload())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 1,000 bytes at file '1.png'" in error.value.details()
