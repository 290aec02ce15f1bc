"""Label audit: real Fashion-MNIST images with labels flipped on purpose, through the core and both doors."""

import asyncio
import io
import threading
import time
from collections.abc import Awaitable

import anyio
import grpc
import httpx
import pytest
import torch
from PIL import Image

from adapters.audit import (
    MAX_DUPLICATE_CANDIDATES,
    audit_labels,
    class_thresholds,
    cross_label_duplicates,
    label_suspects,
)
from adapters.errors import InvalidInput
from adapters.search_space import SearchSpace
from adapters.trainer import raise_if_cancelled
from client import models as client_models
from harness.sample_data import fashion_mnist_pngs
from service import auditing
from service.auditing import DEFAULT_AUDIT_ITEMS, AuditRequest, DatasetAuditor
from service.calls import Calls, KeyCheck
from service.errors import DeadlineExceeded, NotFound, ResourceExhausted
from service.grpc import convert
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.resources import DatasetAudit
from service.runtime import Runtime
from service.training import TrainRequest

TENANT = "acme"
CLASSES = ("trouser", "bag", "sneaker")  # clearly different garments: a flip among them is a plain error
ONE_TRIAL = SearchSpace(lr=[1.0], weight_decay=[1e-3])
FLIPS = {"trouser": "bag", "bag": "sneaker", "sneaker": "trouser"}  # the first image of each class, relabelled


@pytest.fixture(scope="module")
def core(make_core, tmp_path_factory):
    """One core for the module: the images' features are computed once, whatever the tests upload."""
    return make_core(tmp_path_factory.mktemp("audit"))


@pytest.fixture(scope="module")
def images() -> list[tuple[bytes, str]]:
    """Eight real images of each of three classes, in a stable order."""
    return [(data, label) for data, label in fashion_mnist_pngs("train", per_class=8, seed=5) if label in CLASSES]


def with_flips(images: list[tuple[bytes, str]]) -> tuple[list[tuple[str, bytes, str]], dict[int, str]]:
    """The upload with the first image of each class under the wrong label; position -> true label."""
    examples: list[tuple[str, bytes, str]] = []
    truth: dict[int, str] = {}
    for i, (data, label) in enumerate(images):
        if label in FLIPS and label not in truth.values():
            truth[i] = label
            label = FLIPS[label]
        examples.append((f"{i}.png", data, label))
    return examples, truth


def jpeg_of(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_flipped_labels_are_flagged_first_with_their_true_label_as_suggestion(core, images):
    examples, truth = with_flips(images)
    dataset = core.datasets.create(TENANT, "flipped", examples)
    audited = core.auditor.audit(TENANT, AuditRequest(dataset_id=dataset.id))
    suspects = audited.audit.suspects
    top = {s.index: audited.classes[s.suggested] for s in suspects[: len(truth)]}
    assert top == truth
    for suspect in suspects[: len(truth)]:
        assert suspect.suggested_probability > suspect.given_probability
    assert audited.audit.suspect_count == len(suspects)


def test_clean_labels_of_distinct_classes_are_not_flagged(core, images):
    dataset = core.datasets.create(TENANT, "clean", [(f"{i}.png", d, label) for i, (d, label) in enumerate(images)])
    audited = core.auditor.audit(TENANT, AuditRequest(dataset_id=dataset.id))
    assert audited.audit.suspects == []
    assert audited.audit.duplicate_count == 0


def test_the_same_image_and_a_reencoded_copy_under_other_labels_are_duplicates(core, images):
    examples = [(f"{i}.png", d, label) for i, (d, label) in enumerate(images)]
    trouser = next(i for i, (_, label) in enumerate(images) if label == "trouser")
    bag = next(i for i, (_, label) in enumerate(images) if label == "bag")
    examples.append(("same-trouser.png", images[trouser][0], "bag"))
    examples.append(("bag-as-jpeg.jpg", jpeg_of(images[bag][0]), "sneaker"))
    dataset = core.datasets.create(TENANT, "duplicates", examples)
    audit = core.auditor.audit(TENANT, AuditRequest(dataset_id=dataset.id)).audit
    pairs = {(d.first, d.second): d for d in audit.duplicates}
    assert audit.duplicate_count == 2
    identical = pairs[(trouser, len(images))]
    assert identical.identical and identical.similarity == pytest.approx(1.0, abs=1e-4)
    near = pairs[(bag, len(images) + 1)]
    assert not near.identical and near.similarity >= 0.98
    assert audit.duplicates[0] is identical  # the same image ranks first


def test_the_near_duplicate_search_finds_the_same_pairs_in_blocks(core, images, monkeypatch):
    backbone = core.backbones["mobilenet_v2"]
    dataset = core.datasets.create(TENANT, "blocks", [(f"{i}.png", d, label) for i, (d, label) in enumerate(images)])
    shas = [sha for sha, _ in core.datasets.examples(TENANT, dataset.id)]
    x = core.extractor.features(backbone, backbone.num_blocks, shas)
    y = torch.tensor([CLASSES.index(label) for _, label in images])
    count, whole, _ = cross_label_duplicates(x, y, min_similarity=0.5, limit=1000)
    monkeypatch.setattr("adapters.audit.SIMILARITY_BLOCK_ROWS", 5)
    blocked_count, blocked, _ = cross_label_duplicates(x, y, min_similarity=0.5, limit=1000)
    assert count == blocked_count > 0  # a low threshold: some pairs of different classes reach it
    similarity = {(d.first, d.second): d.similarity for d in whole}
    assert {(d.first, d.second): d.similarity for d in blocked} == pytest.approx(similarity, abs=1e-5)
    _, top, _ = cross_label_duplicates(x, y, min_similarity=0.5, limit=3)
    assert [d.similarity for d in top] == pytest.approx(sorted(similarity.values(), reverse=True)[:3], abs=1e-5)


def test_a_label_less_probable_than_on_images_of_other_classes_is_flagged():
    probabilities = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.95, 0.05]])
    y = torch.tensor([0, 0, 1, 1])
    # class 0 on the images labelled 1: (0.2 + 0.95) / 2; class 1 on those labelled 0: (0.1 + 0.3) / 2
    thresholds = class_thresholds(probabilities, y)
    assert thresholds.tolist() == pytest.approx([0.575, 0.2])
    flagged = label_suspects(probabilities, y, thresholds)
    assert [(s.index, s.suggested, s.given_probability) for s in flagged] == [(3, 0, pytest.approx(0.05))]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"duplicate_similarity": 0.0}, "similarity threshold must be in"),
        ({"max_suspects": -1}, "max_suspects must be at least 0"),
    ],
)
def test_bad_audit_arguments_are_refused(args, message):
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(InvalidInput, match=message):
        audit_labels(x, y, 2, **args)


def test_a_class_with_one_example_cannot_be_audited():
    with pytest.raises(InvalidInput, match="at least 2 examples of every class"):
        audit_labels(torch.randn(5, 4), torch.tensor([0, 0, 0, 0, 1]), 2)


def test_another_tenants_dataset_is_not_found_and_neither_is_a_backbone_not_loaded(core, images):
    dataset = core.datasets.create("globex", "theirs", [(f"{i}.png", d, lbl) for i, (d, lbl) in enumerate(images)])
    with pytest.raises(NotFound):
        core.auditor.audit(TENANT, AuditRequest(dataset_id=dataset.id))
    with pytest.raises(NotFound, match="backbone 'resnet9000' is not loaded.*mobilenet_v2"):
        core.auditor.audit("globex", AuditRequest(dataset_id=dataset.id, backbone="resnet9000"))


def test_a_trained_versions_metrics_carry_the_audit(core, images):
    examples, truth = with_flips(images)
    dataset = core.datasets.create(TENANT, "train-audit", examples)
    version = core.trainer.train(TENANT, TrainRequest(dataset_id=dataset.id, head_name="audited", search=ONE_TRIAL))
    audit = version.metrics["audit"]
    assert audit["suspect_count"] >= len(truth)
    assert {s["index"]: s["suggested_label"] for s in audit["suspects"][: len(truth)]} == truth
    assert all(s["file_name"] == f"{s['index']}.png" and s["client_id"] is None for s in audit["suspects"])


# -- the doors -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(core) -> Runtime:
    """The module's core behind both doors, with API keys: acme's key, and a dataset of globex's."""
    core.settings.auth = "keys"
    return Runtime.around(core)


@pytest.fixture(scope="module")
def keys(runtime) -> dict[str, str]:
    secrets = {}
    for tenant in ("door-acme", "door-globex"):
        runtime.tenants.create_tenant(tenant)
        secrets[tenant] = runtime.tenants.create_key(tenant).secret
    return secrets


@pytest.mark.anyio
async def test_http_audit_answers_the_owner_and_not_found_to_another_tenant(runtime, keys, images):
    examples, truth = with_flips(images)
    dataset = runtime.core.datasets.create("door-acme", "flipped", examples)
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:

        async def audit(tenant: str, **params) -> httpx.Response:
            return await client.get(
                f"/v1/datasets/{dataset.id}:audit", params=params, headers={"Authorization": f"Bearer {keys[tenant]}"}
            )

        mine = await audit("door-acme", max_suspects=3)
        theirs = await audit("door-globex")
        bad_backbone = await audit("door-acme", backbone="resnet9000")
        too_many = await audit("door-acme", max_suspects=5000)
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["dataset"] == f"datasets/{dataset.id}" and body["backbone"] == "mobilenet_v2"
    assert len(body["suspects"]) == 3 <= body["suspect_count"]
    assert {s["example"]["index"]: s["suggested_label"] for s in body["suspects"]} == truth
    assert theirs.status_code == 404 and theirs.json()["code"] == "not_found"
    assert bad_backbone.status_code == 404 and "resnet9000" in bad_backbone.json()["message"]
    assert too_many.status_code == 422 and too_many.json()["code"] == "invalid_argument"
    assert "max_suspects" in too_many.json()["message"]


@pytest.mark.anyio
async def test_grpc_audit_answers_the_owner_and_refuses_others_and_bad_arguments(runtime, keys, images):
    examples, truth = with_flips(images)
    dataset = runtime.core.datasets.create("door-acme", "flipped", examples)
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rpc.DatasetServiceStub(channel)

            async def audit(tenant: str, **fields) -> pb.DatasetAudit:
                request = api.AuditDatasetRequest(name=f"datasets/{dataset.id}", **fields)
                return await stub.AuditDataset(request, metadata=[("authorization", f"Bearer {keys[tenant]}")])

            found = await audit("door-acme", max_suspects=3, duplicate_similarity=0.99)
            refused = {}
            for case, tenant, fields in [
                ("theirs", "door-globex", {}),
                ("backbone", "door-acme", {"backbone": "resnet9000"}),
                ("negative", "door-acme", {"max_duplicates": -1}),
                ("similarity", "door-acme", {"duplicate_similarity": 1.5}),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await audit(tenant, **fields)
                refused[case] = error.value.code()
    finally:
        await server.stop(grace=1)
    assert {s.example.index: s.suggested_label for s in found.suspects} == truth
    assert found.suspect_count >= 3 and found.folds == 5
    assert set(found.class_thresholds) == set(CLASSES)
    assert refused == {
        "theirs": grpc.StatusCode.NOT_FOUND,
        "backbone": grpc.StatusCode.NOT_FOUND,
        "negative": grpc.StatusCode.INVALID_ARGUMENT,
        "similarity": grpc.StatusCode.INVALID_ARGUMENT,
    }


# -- bounds: work, wall clock, cancellation (issue 21, item 11) -------------------------------------------------------


def test_a_near_zero_similarity_audit_of_hundreds_of_images_stops_truncated_within_its_bound(core):
    """Every cross-label pair of 300 images would be a candidate (about 40,000): the search stops after the
    block that reaches MAX_DUPLICATE_CANDIDATES and says so, within the wall-clock bound."""
    images = fashion_mnist_pngs("train", per_class=30, seed=7)  # 10 classes x 30
    dataset = core.datasets.create(TENANT, "hundreds", [(f"{i}.png", d, lbl) for i, (d, lbl) in enumerate(images)])
    auditor = DatasetAuditor(
        core.datasets, core.extractor, core.trainer.backbone, core.trainer.default_backbone, max_seconds=300
    )
    started = time.monotonic()
    audited = auditor.audit(TENANT, AuditRequest(dataset_id=dataset.id, duplicate_similarity=1e-6))
    assert time.monotonic() - started < 300
    audit = audited.audit
    cross_label_pairs = sum(1 for i in range(300) for j in range(i + 1, 300) if images[i][1] != images[j][1])
    assert audit.duplicates_truncated
    assert MAX_DUPLICATE_CANDIDATES <= audit.duplicate_count < cross_label_pairs  # a lower bound, said so
    assert len(audit.duplicates) == DEFAULT_AUDIT_ITEMS  # the ranking is still bounded by max_duplicates
    similarities = [d.similarity for d in audit.duplicates]
    assert similarities == sorted(similarities, reverse=True)
    default = auditor.audit(TENANT, AuditRequest(dataset_id=dataset.id)).audit  # the same dataset, the default 0.98
    assert not default.duplicates_truncated
    # Both doors and the client carry it as a field of the resource (HTTP JSON, the gRPC message)
    resource = DatasetAudit.of(audited)
    assert resource.model_dump()["duplicates_truncated"] is True
    assert convert.message(resource, pb.DatasetAudit).duplicates_truncated
    assert client_models.DatasetAudit.model_validate_json(resource.model_dump_json()).duplicates_truncated


def test_the_duplicate_search_keeps_only_the_best_pairs_of_each_block_and_stops_at_its_bound():
    x = torch.randn(400, 8)
    y = torch.arange(400) % 4
    count, top, truncated = cross_label_duplicates(x, y, min_similarity=1e-6, limit=5, max_candidates=100)
    assert truncated and 100 <= count < 400 * 399 // 2 and len(top) == 5
    whole, _, whole_truncated = cross_label_duplicates(x, y, min_similarity=0.5, limit=5, max_candidates=10**9)
    assert not whole_truncated and whole > 0


def test_an_audit_past_its_wall_clock_limit_fails_naming_the_setting_and_frees_the_slot(core, images):
    dataset = core.datasets.create(TENANT, "slow", [(f"{i}.png", d, lbl) for i, (d, lbl) in enumerate(images)])
    hurried = DatasetAuditor(
        core.datasets, core.extractor, core.trainer.backbone, core.trainer.default_backbone, max_seconds=1e-9
    )
    slots = threading.BoundedSemaphore(1)
    with pytest.raises(DeadlineExceeded, match="GRAFT_MAX_AUDIT_SECONDS"):
        hurried.audit(TENANT, AuditRequest(dataset_id=dataset.id), slots=slots)
    assert slots.acquire(blocking=False)  # the slot is free


class HeldAudit:
    """Stands in for audit_labels: holds the audit slot, checking its stop flag, until that flag stops it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.stopped = threading.Event()

    def __call__(self, *args, cancelled, **kwargs):
        self.started.set()
        try:
            for _ in range(6000):  # 60 s at most
                raise_if_cancelled(cancelled)
                time.sleep(0.01)
            raise AssertionError("the audit was never stopped")
        finally:
            self.stopped.set()


def slot_is_free(runtime: Runtime) -> bool:
    if not runtime.audit_slots.acquire(blocking=False):
        return False
    runtime.audit_slots.release()
    return True


def audit_call(runtime: Runtime, dataset_id: str) -> Awaitable[DatasetAudit]:
    """The AuditDataset call of both doors, made by tenant ``TENANT``, with every argument at its default."""
    return Calls(runtime, KeyCheck(runtime, None, TENANT, 60.0)).audit_dataset(dataset_id, "", 0, 0, None)


@pytest.mark.anyio
async def test_a_cancelled_audit_call_stops_its_work_and_frees_the_slot(runtime, images, monkeypatch):
    """gRPC cancels the handler's task when its client cancels: the audit thread stops at its next check."""
    held = HeldAudit()
    monkeypatch.setattr(auditing, "audit_labels", held)
    dataset = runtime.core.datasets.create(
        TENANT, "cancelled", [(f"{i}.png", d, lbl) for i, (d, lbl) in enumerate(images)]
    )
    task = asyncio.ensure_future(audit_call(runtime, dataset.id))
    assert await anyio.to_thread.run_sync(held.started.wait, 60)
    assert not slot_is_free(runtime)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await anyio.to_thread.run_sync(held.stopped.wait, 10), "the audit kept running"
    with anyio.fail_after(10):
        while not slot_is_free(runtime):
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_an_http_audit_whose_client_disconnects_stops_and_frees_the_slot(runtime, keys, images, monkeypatch):
    held = HeldAudit()
    monkeypatch.setattr(auditing, "audit_labels", held)
    examples = [(f"{i}.png", d, lbl) for i, (d, lbl) in enumerate(images)]
    dataset = runtime.core.datasets.create("door-acme", "left", examples)
    app = create_app(runtime.settings, lambda: runtime)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/v1/datasets/{dataset.id}:audit",
        "raw_path": f"/v1/datasets/{dataset.id}:audit".encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("graft", 80),
        "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"graft"), (b"authorization", f"Bearer {keys['door-acme']}".encode())],
    }
    sent: list[dict] = []
    first = True

    async def receive() -> dict:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        if held.started.is_set():
            return {"type": "http.disconnect"}  # the client left while the audit ran
        await anyio.sleep(3600)  # nothing yet: Starlette's disconnect check cancels this wait
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    with anyio.fail_after(60):
        await app(scope, receive, send)
    assert held.started.is_set() and await anyio.to_thread.run_sync(held.stopped.wait, 10), "the audit kept running"
    with anyio.fail_after(10):
        while not slot_is_free(runtime):
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_an_audit_holding_one_runtimes_slot_does_not_refuse_an_audit_in_another(core, images):
    dataset = core.datasets.create(TENANT, "two-runtimes", [(f"{i}.png", d, lbl) for i, (d, lbl) in enumerate(images)])
    busy, other = Runtime.around(core), Runtime.around(core)
    assert busy.audit_slots.acquire(blocking=False)  # an audit runs in the busy runtime, which is never used again
    with pytest.raises(ResourceExhausted, match="GRAFT_MAX_CONCURRENT_AUDITS") as refused:
        await audit_call(busy, dataset.id)
    assert refused.value.retry_after_s
    assert (await audit_call(other, dataset.id)).folds > 0


@pytest.mark.anyio
async def test_a_worker_runs_as_many_audits_at_once_as_configured(core, images, monkeypatch):
    monkeypatch.setattr(core.settings, "max_concurrent_audits", 2)
    runtime = Runtime.around(core)
    dataset = core.datasets.create(TENANT, "two-slots", [(f"{i}.png", d, lbl) for i, (d, lbl) in enumerate(images)])
    assert runtime.audit_slots.acquire(blocking=False)  # one audit runs (this runtime is never used again)
    assert (await audit_call(runtime, dataset.id)).folds > 0  # a second one runs beside it
    assert runtime.audit_slots.acquire(blocking=False)  # while two run, a third is refused
    with pytest.raises(ResourceExhausted, match="GRAFT_MAX_CONCURRENT_AUDITS"):
        await audit_call(runtime, dataset.id)
