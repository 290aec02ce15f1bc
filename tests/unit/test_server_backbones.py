"""Which backbones a server loads, offers and trains on when a request names none (GRAFT_DEFAULT_BACKBONE)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from client.models import Backbone as ClientBackbone
from harness.sample_data import fashion_mnist_pngs
from service.auditing import AuditRequest
from service.config import Settings
from service.core import Core
from service.engine.runtimes import RUNTIMES
from service.errors import NotFound
from service.grpc import convert
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.http.app import create_app
from service.jobs.runner import JobRunner
from service.quotas import Quotas
from service.resources import Backbone
from service.runtime import Runtime
from service.training import TrainRequest

REPO = Path(__file__).resolve().parents[2]
TENANT = "acme"


@pytest.fixture
def core_defaulting_to_untrained(tmp_path, monkeypatch, mobilenet, untrained_backbone) -> Core:
    """A core that loads MobileNetV2 and the untrained test backbone, configured to default to the latter."""
    monkeypatch.setenv("GRAFT_BACKBONES", json.dumps(["mobilenet_v2", untrained_backbone]))
    monkeypatch.setenv("GRAFT_DEFAULT_BACKBONE", untrained_backbone)
    core = Core.open(Settings(data_dir=tmp_path), backbones=[untrained_backbone])
    core.backbones[mobilenet.name] = mobilenet  # the session's, already loaded
    return core


@pytest.fixture
def dataset_id(core_defaulting_to_untrained) -> str:
    images = [(f"{i}.png", data, label) for i, (data, label) in enumerate(fashion_mnist_pngs("train", 4, seed=0))]
    return core_defaulting_to_untrained.datasets.create(TENANT, "small", images).id


def test_a_training_that_names_no_backbone_trains_on_the_configured_default(
    core_defaulting_to_untrained, dataset_id, untrained_backbone
):
    request = TrainRequest(dataset_id=dataset_id, head_name="h", kind="prototype")
    version = core_defaulting_to_untrained.trainer.train(TENANT, request)
    assert version.backbone == untrained_backbone


@pytest.mark.anyio
async def test_a_job_that_names_no_backbone_records_the_default_it_trains_on(
    core_defaulting_to_untrained, dataset_id, untrained_backbone
):
    core = core_defaulting_to_untrained
    runner = JobRunner(core.db, core.trainer, core.settings, Quotas(core.settings))
    job = await runner.submit(TENANT, TrainRequest(dataset_id=dataset_id, head_name="h"))
    assert job.request.backbone == untrained_backbone


def test_an_audit_that_names_no_backbone_runs_on_the_configured_default(
    core_defaulting_to_untrained, dataset_id, untrained_backbone
):
    audited = core_defaulting_to_untrained.auditor.audit(TENANT, AuditRequest(dataset_id=dataset_id))
    assert audited.backbone == untrained_backbone


def test_a_default_backbone_that_is_not_loaded_is_refused_naming_the_loaded_ones(monkeypatch):
    monkeypatch.setenv("GRAFT_DEFAULT_BACKBONE", "resnet50")
    refusal = r"'resnet50' is not one of the loaded backbones \(GRAFT_BACKBONES\): mobilenet_v2, efficientnet_lite2"
    with pytest.raises(ValidationError, match=refusal):
        Settings()
    with pytest.raises(ValidationError, match="'efficientnet_lite2' is not one of the loaded backbones"):
        Settings(backbones=["mobilenet_v2"], default_backbone="efficientnet_lite2")


def test_the_service_does_not_start_with_a_default_backbone_it_does_not_load():
    env = {**os.environ, "GRAFT_BACKBONES": '["mobilenet_v2"]', "GRAFT_DEFAULT_BACKBONE": "efficientnet_lite2"}
    result = subprocess.run(
        [sys.executable, "-c", "import service.app"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "GRAFT_DEFAULT_BACKBONE 'efficientnet_lite2' is not one of the loaded backbones" in result.stderr


# -- Test-only backbones are the tests' own: a server can neither load nor offer them -----------------------------


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
    assert refused.status_code == 404
    assert "backbone 'mobilenet_v3_small-untrained' is not loaded" in refused.text


@pytest.mark.anyio
async def test_a_backbone_reports_the_runtime_precision_and_speed_its_trunk_runs_at(http, mobilenet):
    got = (await http.get("/v1/backbones/mobilenet_v2")).json()
    assert got["trunk"] == mobilenet.trunk.model_dump(mode="json")
    assert got["trunk"]["runtime"] in RUNTIMES and got["trunk"]["precision"] == "fp32"
    assert got["trunk"]["images_per_second"] > 0 and got["trunk"]["max_abs_diff"] <= 1e-4

    message = convert.message(Backbone.of(mobilenet.info()), pb.Backbone)  # what GetBackbone answers
    assert message.trunk.runtime == mobilenet.trunk.runtime and message.trunk.precision == "fp32"
    assert message.trunk.images_per_second == pytest.approx(mobilenet.trunk.images_per_second)
    assert ClientBackbone.model_validate(got).trunk.runtime == mobilenet.trunk.runtime  # the client reads it


def test_an_unknown_trunk_runtime_or_precision_stops_the_settings(monkeypatch):
    monkeypatch.setenv("GRAFT_TRUNK_RUNTIME", "tensorrt")
    with pytest.raises(ValidationError, match="GRAFT_TRUNK_RUNTIME must be 'auto' or one of"):
        Settings()
    monkeypatch.setenv("GRAFT_TRUNK_RUNTIME", "auto")
    monkeypatch.setenv("GRAFT_TRUNK_PRECISION", "int4")
    with pytest.raises(ValidationError, match="trunk_precision"):
        Settings()
