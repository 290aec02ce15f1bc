"""Which backbones a server may load and a request may name: the registry's, never a test's."""

import httpx
import pytest

from service.config import Settings
from service.core import Core
from service.errors import NotFound
from service.http.app import create_app
from service.runtime import Runtime

TENANT = "acme"


def test_a_server_configured_with_the_untrained_backbone_refuses_to_start(tmp_path):
    name = "mobilenet_v3_small-untrained"
    with pytest.raises(NotFound, match=f"unknown backbone '{name}'; known: efficientnet_lite2, mobilenet_v2"):
        Core.open(Settings(data_dir=tmp_path, backbones=[name], default_backbone=name))


@pytest.fixture
async def http(make_core, tmp_path):
    """The HTTP door, as tenant acme, on a core that loads MobileNetV2."""
    runtime = Runtime.around(make_core(tmp_path))
    runtime.tenants.create_tenant(TENANT)
    key = runtime.tenants.create_key(TENANT).secret
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://graft", headers=headers) as client:
        yield client


@pytest.mark.anyio
async def test_the_untrained_backbone_is_neither_listed_nor_trainable(http):
    listed = (await http.get("/v1/backbones")).json()["backbones"]
    assert [backbone["name"] for backbone in listed] == ["backbones/mobilenet_v2"]
    spec = {"dataset": "datasets/ds", "head": "h", "backbone": "mobilenet_v3_small-untrained"}
    refused = await http.post("/v1/jobs", json=spec)
    assert refused.status_code == 400
    assert "backbone 'mobilenet_v3_small-untrained' is not loaded" in refused.text
