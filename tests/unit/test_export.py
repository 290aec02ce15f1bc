"""Exports a user runs without graft: ONNX and torch.export files of backbone + heads, checked on real images.

Heads are trained on real Fashion-MNIST images with the real MobileNetV2; files
are fetched through the real HTTP app, run in ONNX Runtime / torch.export, and
compared with graft's own predictions (the Predictor) on images it never saw.
"""

import asyncio
import io
import json
import threading

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from adapters.kinds import HeadKind
from adapters.search_space import SearchSpace
from harness.sample_data import fashion_mnist_pngs
from service import export
from service.calls import ExportQueue
from service.engine.predictor import Predictor
from service.errors import InvalidArgument, ResourceExhausted
from service.http.app import create_app
from service.prediction_options import PredictOptions
from service.runtime import Runtime
from service.store.images import decode_rgb
from service.training import HyperParamOverrides, TrainRequest

pytestmark = pytest.mark.anyio

TENANT = "acme"
ONE_TRIAL = SearchSpace(lr=[1.0], weight_decay=[1e-3])


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, make_core) -> Runtime:
    """Three heads on one 50-image dataset: linear, mlp and a finetune of the last block."""
    core = make_core(tmp_path_factory.mktemp("graft"))
    files = fashion_mnist_pngs("train", per_class=5, seed=5)
    dataset = core.datasets.create(TENANT, "fashion", [(f"{i}.png", d, label) for i, (d, label) in enumerate(files)])
    few_epochs = HyperParamOverrides(epochs=3)
    for name, kind, search in [
        ("linear", HeadKind.LINEAR, ONE_TRIAL),
        ("mlp", HeadKind.MLP, SearchSpace(lr=[3e-3], weight_decay=[1e-4], hidden=[64])),
        ("tuned", HeadKind.FINETUNE, SearchSpace(lr=[1e-3], weight_decay=[1e-4])),
    ]:
        request = TrainRequest(
            dataset_id=dataset.id,
            head_name=name,
            kind=kind,
            search=search,
            finetune_blocks=1 if kind is HeadKind.FINETUNE else None,
            hyperparams=None if kind is HeadKind.LINEAR else few_epochs,
        )
        core.trainer.train(TENANT, request)
    runtime = Runtime.around(core)
    runtime.tenants.create_tenant(TENANT)
    return runtime


@pytest.fixture(scope="module")
def key(runtime) -> str:
    return runtime.tenants.create_key(TENANT).secret


def download(runtime: Runtime, key: str, head: str, **params: str | list[str]) -> httpx.Response:
    """``GET /v1/heads/{head}:export`` through the real app."""

    async def get() -> httpx.Response:
        app = create_app(runtime.settings, lambda: runtime)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://graft") as client:
            return await client.get(
                f"/v1/heads/{head}:export", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=600
            )

    return asyncio.run(get())


@pytest.fixture(scope="module")
def onnx_file(runtime, key) -> bytes:
    """A linear and a finetune head in one file (different split points of the same backbone)."""
    response = download(runtime, key, "linear", format="onnx", additional_heads=["tuned@1"])
    assert response.status_code == 200, response.text
    assert 'filename="linear_v1+tuned_v1.onnx"' in response.headers["content-disposition"]
    return response.content


@pytest.fixture(scope="module")
def unseen_images() -> list[bytes]:
    return [data for data, _ in fashion_mnist_pngs("test", per_class=1, seed=1)]


def graft_probabilities(runtime: Runtime, heads: list[str], images: list[bytes], classes: list[str]):
    """What graft's own predict path answers, as [head][image, class] in the order of ``classes``."""

    async def predict():
        predictor = Predictor(runtime.core.backbones, runtime.predictor.heads, runtime.settings)
        try:
            return await predictor.predict(TENANT, images, heads, PredictOptions(top_k=len(classes)))
        finally:
            await predictor.stop()

    answers = asyncio.run(predict())
    out = np.zeros((len(heads), len(images), len(classes)), dtype=np.float32)
    for i, answer in enumerate(answers):
        for h, head in enumerate(answer.heads):
            for score in head.top:
                out[h, i, classes.index(score.label)] = score.score
    return out


def model_input(runtime: Runtime, images: list[bytes]) -> torch.Tensor:
    """The transforms the file's metadata describes, as graft applies them."""
    backbone = runtime.core.backbones["mobilenet_v2"]
    return torch.stack([backbone.preprocess(decode_rgb(data, max_pixels=10**7)) for data in images])


def manifest(data: bytes) -> dict:
    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    return json.loads(props["graft.json"])


def test_an_onnx_file_answers_what_graft_answers_for_each_head_it_carries(runtime, onnx_file, unseen_images):
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["linear_v1", "tuned_v1"]
    assert session.get_inputs()[0].name == "images" and session.get_inputs()[0].shape[1:] == [3, 224, 224]
    images = model_input(runtime, unseen_images).numpy()
    got = session.run(None, {"images": images})  # 10 images, traced with 2: the batch axis is dynamic
    for alone, together in zip(session.run(None, {"images": images[:1]}), got, strict=True):
        np.testing.assert_allclose(alone[0], together[0], atol=1e-6)
    classes = manifest(onnx_file)["outputs"][0]["classes"]
    want = graft_probabilities(runtime, ["linear", "tuned@1"], unseen_images, classes)
    for output, expected in zip(got, want, strict=True):
        assert output.shape == (10, 10)
        assert float(np.abs(output - expected).max()) <= 1e-4
    assert (got[0].argmax(1) == want[0].argmax(1)).all()


def test_the_onnx_metadata_names_classes_input_transforms_and_provenance(runtime, onnx_file):
    meta = manifest(onnx_file)
    linear = runtime.core.heads.resolve(TENANT, "linear")
    assert meta["format"] == "onnx" and meta["graft_version"]
    assert meta["input"] | {"mean": None, "std": None} == {
        "name": "images",
        "layout": "NCHW",
        "dtype": "float32",
        "color": "RGB",
        "resize": 256,
        "interpolation": "bilinear",
        "crop": 224,
        "scale": "pixel values / 255, then (x - mean) / std per channel",
        "mean": None,
        "std": None,
    }
    assert meta["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert [o["name"] for o in meta["outputs"]] == ["linear_v1", "tuned_v1"]
    first = meta["outputs"][0]
    assert first["classes"] == linear.classes and len(first["classes"]) == 10
    provenance = (first["head"], first["version"], first["kind"], first["backbone"])
    assert provenance == ("linear", 1, "linear", "mobilenet_v2")
    assert first["weights_sha256"] == linear.weights_sha256 and first["dataset"] == linear.dataset_id
    assert meta["outputs"][1]["kind"] == "finetune"
    # Checked before it was sent: on the dataset's own images, one of each class first.
    assert meta["check"]["images"] == export.CHECK_IMAGES
    assert meta["check"]["source"] == f"{export.CHECK_IMAGES} images of datasets/{linear.dataset_id}"
    assert meta["check"]["max_abs_diff"] <= 1e-4


def test_a_pt2_file_loads_with_torch_export_and_answers_what_graft_answers(runtime, key, unseen_images):
    response = download(runtime, key, "mlp", format="pt2")
    assert response.status_code == 200, response.text
    extra = {"graft.json": ""}
    program = torch.export.load(io.BytesIO(response.content), extra_files=extra)
    meta = json.loads(extra["graft.json"])
    assert meta["format"] == "pt2" and [o["name"] for o in meta["outputs"]] == ["mlp_v1"]
    with torch.no_grad():
        (got,) = program.module()(model_input(runtime, unseen_images))
    want = graft_probabilities(runtime, ["mlp"], unseen_images, meta["outputs"][0]["classes"])[0]
    assert float(np.abs(got.numpy() - want).max()) <= 1e-4


def error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["message"]


def test_torchscript_is_refused_with_what_to_use_instead(runtime, key):
    status, message = error(download(runtime, key, "linear", format="torchscript"))
    assert status == 422 and "TorchScript export was removed" in message and "'pt2'" in message


def test_an_unknown_format_lists_the_valid_ones(runtime, key):
    status, message = error(download(runtime, key, "linear", format="tflite"))
    assert status == 422 and "'safetensors', 'onnx' or 'pt2'" in message


def test_an_unknown_additional_head_is_not_found(runtime, key):
    status, message = error(download(runtime, key, "linear", format="onnx", additional_heads=["nope"]))
    assert status == 404 and "nope" in message


def test_safetensors_holds_one_head_only(runtime, key):
    status, message = error(download(runtime, key, "linear", additional_heads=["mlp"]))
    assert status == 400 and "onnx or pt2" in message


def test_more_heads_than_one_file_may_carry_are_refused(runtime, key):
    too_many = ["mlp"] * export.MAX_HEADS
    status, message = error(download(runtime, key, "linear", format="onnx", additional_heads=too_many))
    assert status == 422 and f"at most {export.MAX_HEADS - 1} items" in message


def test_the_same_head_version_twice_is_refused(runtime, key):
    status, message = error(download(runtime, key, "linear", format="pt2", additional_heads=["linear@1"]))
    assert status == 400 and "linear_v1" in message


def test_heads_on_different_backbones_cannot_share_a_file(runtime):
    linear = runtime.core.heads.resolve(TENANT, "linear")
    other = linear.model_copy(update={"name": "other", "backbone": "efficientnet_lite2"})
    with pytest.raises(InvalidArgument, match="share one backbone"):
        export.check_same_backbone([linear, other])


def test_a_file_that_differs_from_pytorch_is_not_returned(runtime):
    linear = runtime.core.heads.resolve(TENANT, "linear")
    backbone = runtime.core.backbones["mobilenet_v2"]
    model = export.ExportModel(backbone, [linear], [runtime.core.heads.load_tensors(linear)])
    images, source = export.check_inputs(backbone, [], ["ds_gone"], 10**7)
    with torch.no_grad():
        (right,) = model(images)
    assert export.check_against_pytorch(model, images, [right], source, "ONNX").max_abs_diff == 0.0
    wrong = right + torch.where(torch.arange(right.shape[1]) == 0, 1e-3, 0.0)
    with pytest.raises(export.ExportCheckFailed, match="it was not returned") as failed:
        export.check_against_pytorch(model, images, [wrong], source, "ONNX")
    assert failed.value.code == "internal"


def test_without_the_heads_datasets_a_file_is_checked_on_seeded_inputs(runtime):
    assert export.stored_check_images(runtime.core.datasets, TENANT, ["ds_deleted"]) == []
    images, source = export.check_inputs(runtime.core.backbones["mobilenet_v2"], [], ["ds_deleted"], 10**7)
    assert images.shape == (export.CHECK_IMAGES, 3, 224, 224)
    assert source == f"{export.CHECK_IMAGES} seeded random inputs (datasets/ds_deleted no longer exist)"


async def test_exports_beyond_the_waiting_limit_are_told_to_retry():
    queue = ExportQueue(waiting=0)
    started, release = threading.Event(), threading.Event()

    def slow_export() -> bytes:
        started.set()
        release.wait()
        return b"file"

    first = asyncio.ensure_future(queue.run(TENANT, slow_export))
    await asyncio.to_thread(started.wait)
    with pytest.raises(ResourceExhausted, match="retry") as refused:
        await queue.run("globex", slow_export)
    assert refused.value.retry_after_s
    release.set()
    assert await first == b"file"
    assert await queue.run(TENANT, lambda: b"next") == b"next"  # the slot is free again


async def test_one_tenant_holds_at_most_one_running_and_one_waiting_export_and_others_go_first():
    """Issue 21, item 18: the queue's places are per tenant; a tenant that has run waits behind the others."""
    queue = ExportQueue(waiting=3)
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def export_of(name: str):
        def build() -> str:
            order.append(name)
            if name == "acme-1":
                started.set()
                release.wait()
            return name

        return build

    running = asyncio.ensure_future(queue.run(TENANT, export_of("acme-1")))
    await asyncio.to_thread(started.wait)
    waiting = asyncio.ensure_future(queue.run(TENANT, export_of("acme-2")))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match="of yours") as refused:
        await queue.run(TENANT, export_of("acme-3"))
    assert refused.value.retry_after_s
    others = [asyncio.ensure_future(queue.run(tenant, export_of(tenant))) for tenant in ("globex", "initech")]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(running, waiting, *others) == ["acme-1", "acme-2", "globex", "initech"]
    assert order == ["acme-1", "globex", "acme-2", "initech"]  # after acme's run, another tenant's first
    cancelled = asyncio.ensure_future(queue.run(TENANT, export_of("never")))
    cancelled.cancel()  # a caller that leaves while waiting gives its place back
    await asyncio.gather(cancelled, return_exceptions=True)
    assert await queue.run(TENANT, export_of("again")) == "again"


def test_an_export_over_the_size_limit_is_refused_before_any_weight_is_loaded(runtime, key, monkeypatch):
    """Issue 21, item 18: the file's weights (trunk to the deepest split point + each head's) vs the limit."""
    backbone = runtime.core.backbones["mobilenet_v2"]
    infos = [runtime.core.heads.resolve(TENANT, name) for name in ("linear", "mlp", "tuned")]
    size = export.file_bytes(backbone, infos)
    assert size == backbone.block_bytes(0, backbone.num_blocks) + sum(info.param_bytes for info in infos)
    assert size > sum(p.numel() * 4 for p in backbone.cpu_copy(0).parameters())  # the trunk, at least
    loads = []
    monkeypatch.setattr(runtime.core.heads, "load_tensors", lambda info: loads.append(info) or {})
    monkeypatch.setattr(runtime.settings, "max_export_bytes", size - 1)
    assert runtime.core.settings is runtime.settings
    status, message = error(download(runtime, key, "linear", format="onnx", additional_heads=["mlp", "tuned"]))
    assert status == 400 and "GRAFT_MAX_EXPORT_BYTES" in message and f"{size:,} bytes" in message
    assert loads == []  # refused before any weight was read
    export.check_file_size(backbone, infos, size)  # at the limit: allowed
