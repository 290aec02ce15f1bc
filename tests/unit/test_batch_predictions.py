"""Batch predictions (issue 26, part 4): heads x a stored dataset as a background job, over both doors; results
equal online predictions of the same images; bad inputs, tenant isolation, and a job resumed after its replica's
lease expired answers every image once."""

import argparse
import asyncio
import csv
import io
import json
import zipfile
from datetime import timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from sqlalchemy import func, select, update

from adapters.search_space import SearchSpace
from client import cli, models
from client.errors import FailedPrecondition, NotFound
from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from harness.inprocess import serve_http
from harness.sample_data import fashion_mnist_pngs
from service.batch import BatchOptions, BatchRunner
from service.batch.results import ResultsFormat
from service.config import Settings
from service.core import Core
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.jobs import JobState, LeaseLost
from service.prediction_options import PredictOptions
from service.runtime import Runtime
from service.store.db import BatchPredictionRow, BatchResultRow, WebhookDeliveryRow, utcnow
from service.training import TrainRequest

TENANT, OTHER = "acme", "globex"
CHUNK = 4  # images per checkpoint: the 9-image dataset takes three chunks
ONE_TRIAL = SearchSpace(lr=[1.0], weight_decay=[1e-3])


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes, str]]:
    files = fashion_mnist_pngs("test", per_class=3, seed=3)
    return [
        (f"img_{i}.png", data, label) for i, (data, label) in enumerate(files) if label in ("trouser", "bag", "shirt")
    ]


def make_runtime(mobilenet, data_dir: Path, **settings) -> Runtime:
    core = Core.open(Settings(data_dir=data_dir, batch_chunk_images=CHUNK, **settings), backbones=[])
    core.backbones[mobilenet.name] = mobilenet
    runtime = Runtime.around(core)
    for tenant in (TENANT, OTHER):
        runtime.tenants.create_tenant(tenant)
    return runtime


@pytest.fixture
def runtime(mobilenet, tmp_path, images) -> Runtime:
    runtime = make_runtime(mobilenet, tmp_path)
    dataset = runtime.core.datasets.create(TENANT, "clothes", images)
    runtime.core.trainer.train(TENANT, TrainRequest(dataset_id=dataset.id, head_name="clothes", search=ONE_TRIAL))
    runtime.core.datasets.create(OTHER, "theirs", [next(i for i in images if i[2] == c) for c in ("bag", "shirt")])
    return runtime


@pytest.fixture
def keys(runtime) -> dict[str, str]:
    return {tenant: runtime.tenants.create_key(tenant).secret for tenant in (TENANT, OTHER)}


def dataset_of(runtime: Runtime, tenant: str) -> str:
    datasets, _ = runtime.core.datasets.list(tenant)
    return f"datasets/{datasets[0].id}"


async def online(runtime: Runtime, images, heads: list[str], top_k: int) -> list[list[tuple]]:
    """What online predictions answer for the same images, per image per head: (version, top labels, top scores)."""
    answers = await runtime.predictor.predict(
        TENANT, [data for _, data, _ in images], heads, PredictOptions(top_k=top_k)
    )
    return [[(h.version, [t.label for t in h.top], [t.score for t in h.top]) for h in a.heads] for a in answers]


def answered(rows: list[dict]) -> list[list[tuple]]:
    return [
        [(h["version"], [t["label"] for t in h["top"]], [t["score"] for t in h["top"]]) for h in row["heads"]]
        for row in rows
    ]


def assert_same_answers(batch: list[list[tuple]], expected: list[list[tuple]]) -> None:
    assert len(batch) == len(expected)
    for got, want in zip(batch, expected, strict=True):
        for (version, labels, scores), (want_version, want_labels, want_scores) in zip(got, want, strict=True):
            assert (version, labels) == (want_version, want_labels)
            assert scores == pytest.approx(want_scores, abs=1e-4)


async def until_done(read, name: str) -> dict:
    for _ in range(1200):
        batch = await read(name)
        if batch["done"]:
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} did not finish")


# -- the HTTP door ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_creates_lists_gets_and_deletes_and_results_match_online_predictions(runtime, keys, images):
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
            auth = {"Authorization": f"Bearer {keys[TENANT]}"}
            spec = {"dataset": dataset_of(runtime, TENANT), "heads": ["clothes", "clothes@1"], "top_k": 3}
            created = await client.post("/v1/batchPredictions", json=spec, headers=auth)
            assert created.status_code == 202, created.text
            name = created.json()["name"]
            assert created.json()["head_versions"] == ["clothes@1", "clothes@1"]
            assert created.json()["images_total"] == len(images)

            async def read(name: str) -> dict:
                return (await client.get(f"/v1/{name}", headers=auth)).json()

            batch = await until_done(read, name)
            second = (await client.post("/v1/batchPredictions", json=spec, headers=auth)).json()["name"]
            await until_done(read, second)
            first_page = (await client.get("/v1/batchPredictions", params={"page_size": 1}, headers=auth)).json()
            token = first_page["next_page_token"]
            rest = (await client.get("/v1/batchPredictions", params={"page_token": token}, headers=auth)).json()
            jsonl = await client.get(f"/v1/{name}/results", headers=auth)
            as_csv = await client.get(f"/v1/{name}/results", params={"format": "csv"}, headers=auth)
            cancel_done = await client.post(f"/v1/{name}:cancel", headers=auth)
            deleted = await client.delete(f"/v1/{name}", headers=auth)
            gone = await client.get(f"/v1/{name}", headers=auth)
            expected = await online(runtime, images, ["clothes", "clothes@1"], top_k=3)
    finally:
        await runtime.stop()
    assert (batch["state"], batch["images_done"], batch["error"]) == ("succeeded", len(images), None)
    assert [b["name"] for b in first_page["batch_predictions"]] == [second]
    assert [b["name"] for b in rest["batch_predictions"]] == [name] and rest["next_page_token"] == ""
    assert jsonl.headers["content-type"].startswith("application/jsonl")
    rows = [json.loads(line) for line in jsonl.text.splitlines()]
    examples, _ = runtime.core.datasets.list_examples(TENANT, name_id(dataset_of(runtime, TENANT)))
    assert [(r["index"], r["file_name"], r["image_sha256"]) for r in rows] == [
        (e.index, e.file_name, e.image_sha256) for e in examples
    ]
    assert_same_answers(answered(rows), expected)
    table = list(csv.reader(io.StringIO(as_csv.text)))
    assert table[0][:5] == ["index", "file_name", "client_id", "image_sha256", "1:clothes version"]
    assert [line[5] for line in table[1:]] == [row["heads"][0]["label"] for row in rows]
    assert cancel_done.status_code == 409 and "already succeeded" in cancel_done.json()["message"]
    assert deleted.status_code == 204 and gone.status_code == 404
    assert_no_results_left(runtime, name)


def name_id(name: str) -> str:
    return name.split("/", 1)[1]


def assert_no_results_left(runtime: Runtime, name: str) -> None:
    with runtime.core.db.session() as session:
        count = session.scalar(
            select(func.count()).select_from(BatchResultRow).where(BatchResultRow.batch_id == name_id(name))
        )
    assert count == 0


@pytest.mark.parametrize(
    ("spec", "status", "message"),
    [
        ({"heads": ["nope"]}, 404, "nope"),
        ({"heads": ["clothes@7"]}, 404, "clothes"),
        ({"heads": ["clothes"] * 9}, 422, "heads"),
        ({"heads": []}, 422, "heads"),
        ({"heads": ["clothes"], "top_k": 0}, 422, "top_k"),
        ({"heads": ["clothes"], "top_k": 21}, 422, "top_k"),
        ({"heads": ["clothes"], "dataset": "theirs"}, 404, "not found"),
        ({"heads": ["clothes"], "extra": 1}, 422, "extra"),
    ],
)
@pytest.mark.anyio
async def test_http_refuses_bad_batch_predictions_with_a_clear_error(runtime, keys, spec, status, message):
    if spec.get("dataset") == "theirs":
        spec = {**spec, "dataset": dataset_of(runtime, OTHER)}  # another tenant's dataset: as unknown as any
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        body = {"dataset": dataset_of(runtime, TENANT), **spec}
        answer = await client.post(
            "/v1/batchPredictions", json=body, headers={"Authorization": f"Bearer {keys[TENANT]}"}
        )
    assert answer.status_code == status, answer.text
    assert message in answer.text
    assert runtime.batches.list(TENANT, 10, None) == ([], None)


@pytest.mark.anyio
async def test_a_queued_batch_prediction_is_cancelled_at_once_and_has_no_results(runtime, keys):
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        auth = {"Authorization": f"Bearer {keys[TENANT]}"}
        spec = {"dataset": dataset_of(runtime, TENANT), "heads": ["clothes"]}
        name = (await client.post("/v1/batchPredictions", json=spec, headers=auth)).json()["name"]  # nothing runs it
        early = await client.get(f"/v1/{name}/results", headers=auth)
        bad_format = await client.get(f"/v1/{name}/results", params={"format": "xlsx"}, headers=auth)
        running_delete = await client.delete(f"/v1/{name}", headers=auth)
        cancelled = await client.post(f"/v1/{name}:cancel", headers=auth)
        results = await client.get(f"/v1/{name}/results", headers=auth)
    assert early.status_code == 409 and "queued" in early.json()["message"]
    assert bad_format.status_code == 422 and "format" in bad_format.text
    assert running_delete.status_code == 409 and "cancel it first" in running_delete.json()["message"]
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["done"] is True
    assert results.status_code == 409 and "cancelled" in results.json()["message"]


@pytest.mark.anyio
async def test_a_repeated_create_with_one_idempotency_key_answers_the_same_batch_prediction(runtime, keys):
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        headers = {"Authorization": f"Bearer {keys[TENANT]}", "Idempotency-Key": "batch-1"}
        spec = {"dataset": dataset_of(runtime, TENANT), "heads": ["clothes"]}
        first = await client.post("/v1/batchPredictions", json=spec, headers=headers)
        again = await client.post("/v1/batchPredictions", json=spec, headers=headers)
        other = await client.post("/v1/batchPredictions", json={**spec, "top_k": 2}, headers=headers)
    assert first.json()["name"] == again.json()["name"]
    assert other.status_code == 409
    assert len(runtime.batches.list(TENANT, 10, None)[0]) == 1


@pytest.mark.anyio
async def test_finished_batch_predictions_and_their_results_expire_after_the_ttl(runtime):
    dataset_id = name_id(dataset_of(runtime, TENANT))
    finished = await runtime.batches.create(TENANT, ["clothes"], dataset_id, BatchOptions())
    queued = await runtime.batches.create(TENANT, ["clothes"], dataset_id, BatchOptions())
    store = runtime.batches.store
    claim = store.claim_next("replica", 30.0)
    assert claim is not None and claim.batch.id == finished.id
    store.write_chunk(claim.holder, 0, [{"index": 0}])
    assert store.finish(claim.holder, JobState.SUCCEEDED)
    assert store.delete_expired(ttl_s=3600.0) == 0
    with runtime.core.db.session() as session:
        session.execute(
            update(BatchPredictionRow)
            .where(BatchPredictionRow.id == finished.id)
            .values(finished_at=utcnow() - timedelta(hours=2))
        )
    assert store.delete_expired(ttl_s=3600.0) == 1
    assert [b.id for b in store.list(TENANT, 10, None)[0]] == [queued.id]
    assert_no_results_left(runtime, f"batchPredictions/{finished.id}")


@pytest.mark.anyio
async def test_another_tenants_batch_prediction_answers_not_found_everywhere(runtime, keys):
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        mine = {"Authorization": f"Bearer {keys[TENANT]}"}
        theirs = {"Authorization": f"Bearer {keys[OTHER]}"}
        spec = {"dataset": dataset_of(runtime, TENANT), "heads": ["clothes"]}
        name = (await client.post("/v1/batchPredictions", json=spec, headers=mine)).json()["name"]
        unknown = await client.get("/v1/batchPredictions/bp_unknown", headers=theirs)
        answers = [
            await client.get(f"/v1/{name}", headers=theirs),
            await client.get(f"/v1/{name}/results", headers=theirs),
            await client.post(f"/v1/{name}:cancel", headers=theirs),
            await client.delete(f"/v1/{name}", headers=theirs),
        ]
        listed = (await client.get("/v1/batchPredictions", headers=theirs)).json()
        still = await client.get(f"/v1/{name}", headers=mine)
    for answer in answers:
        assert answer.status_code == 404
        assert answer.json()["message"] == unknown.json()["message"].replace("bp_unknown", name_id(name))
    assert listed == {"batch_predictions": [], "next_page_token": ""}
    assert still.json()["state"] == "queued"


@pytest.mark.anyio
async def test_a_tenant_may_have_only_its_quota_of_unfinished_batch_predictions(mobilenet, tmp_path, images):
    runtime = make_runtime(mobilenet, tmp_path, quota_batch_predictions=1)
    dataset = runtime.core.datasets.create(TENANT, "clothes", images)
    await runtime.batches.create(TENANT, ["imagenet@mobilenet_v2"], dataset.id, BatchOptions())
    with pytest.raises(Exception, match="GRAFT_QUOTA_BATCH_PREDICTIONS"):
        await runtime.batches.create(TENANT, ["imagenet@mobilenet_v2"], dataset.id, BatchOptions())


# -- the gRPC door ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_grpc_creates_gets_lists_streams_results_cancels_and_deletes(runtime, keys, images):
    await runtime.start()
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rpc.BatchPredictionServiceStub(channel)
            mine = [("authorization", f"Bearer {keys[TENANT]}")]
            theirs = [("authorization", f"Bearer {keys[OTHER]}")]
            spec = pb.BatchPredictionSpec(dataset=dataset_of(runtime, TENANT), heads=["clothes"], top_k=2)
            created = await stub.CreateBatchPrediction(api.CreateBatchPredictionRequest(spec=spec), metadata=mine)

            async def read(name: str) -> dict:
                found = await stub.GetBatchPrediction(api.GetBatchPredictionRequest(name=name), metadata=mine)
                return {"done": found.done, "message": found}

            batch = (await until_done(read, created.name))["message"]
            listed = await stub.ListBatchPredictions(api.ListBatchPredictionsRequest(), metadata=mine)
            chunks = stub.GetBatchPredictionResults(
                api.GetBatchPredictionResultsRequest(name=created.name, format=api.BATCH_RESULTS_FORMAT_JSONL),
                metadata=mine,
            )
            text = b"".join([chunk.chunk async for chunk in chunks]).decode()
            refused = {}
            for case, call, request, metadata in [
                ("theirs", stub.GetBatchPrediction, api.GetBatchPredictionRequest(name=created.name), theirs),
                ("done", stub.CancelBatchPrediction, api.CancelBatchPredictionRequest(name=created.name), mine),
                (
                    "too many heads",
                    stub.CreateBatchPrediction,
                    api.CreateBatchPredictionRequest(
                        spec=pb.BatchPredictionSpec(dataset=spec.dataset, heads=["clothes"] * 9)
                    ),
                    mine,
                ),
                (
                    "unknown head",
                    stub.CreateBatchPrediction,
                    api.CreateBatchPredictionRequest(spec=pb.BatchPredictionSpec(dataset=spec.dataset, heads=["x"])),
                    mine,
                ),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call(request, metadata=metadata)
                refused[case] = error.value.code()
            await stub.DeleteBatchPrediction(api.DeleteBatchPredictionRequest(name=created.name), metadata=mine)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.GetBatchPrediction(api.GetBatchPredictionRequest(name=created.name), metadata=mine)
            expected = await online(runtime, images, ["clothes"], top_k=2)
    finally:
        await server.stop(None)
        await runtime.stop()
    assert (batch.state, batch.images_done, list(batch.head_versions)) == (pb.Job.SUCCEEDED, len(images), ["clothes@1"])
    assert [b.name for b in listed.batch_predictions] == [created.name]
    assert_same_answers(answered([json.loads(line) for line in text.splitlines()]), expected)
    assert refused == {
        "theirs": grpc.StatusCode.NOT_FOUND,
        "done": grpc.StatusCode.FAILED_PRECONDITION,
        "too many heads": grpc.StatusCode.INVALID_ARGUMENT,
        "unknown head": grpc.StatusCode.NOT_FOUND,
    }
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_results_formats_are_the_protos_the_clients_and_the_clis():
    names = api.BatchResultsFormat.keys()
    assert names == [
        "BATCH_RESULTS_FORMAT_UNSPECIFIED",
        *(f"BATCH_RESULTS_FORMAT_{f.value.upper()}" for f in ResultsFormat),
    ]
    assert models.RESULTS_FORMATS == tuple(f.value for f in ResultsFormat)
    subcommands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    batch = next(a for a in subcommands.choices["batch"]._actions if isinstance(a, argparse._SubParsersAction))
    results = batch.choices["results"]
    assert tuple(next(a for a in results._actions if "--format" in a.option_strings).choices) == models.RESULTS_FORMATS


# -- across replicas ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_job_resumed_after_its_replica_lost_the_lease_answers_every_image_once(runtime, images):
    """A replica answers the first chunk and dies (its lease expires); another replica requeues the job, resumes at
    the checkpoint, and the results hold each image once, as a run without interruption answers them."""
    dataset_id = name_id(dataset_of(runtime, TENANT))
    batch = await runtime.batches.create(TENANT, ["clothes"], dataset_id, BatchOptions(top_k=3))
    dead = runtime.batches.store.claim_next("dead-replica", lease_s=30.0)
    assert dead is not None and dead.batch.id == batch.id
    await runtime.start()  # its runner is the second replica; the first holds the job, so it waits
    try:
        head = await runtime.predictor.heads.get(TENANT, "clothes@1")
        examples = await asyncio.to_thread(runtime.batches._examples, dead.batch, 0)
        options = PredictOptions(top_k=3)
        first = await asyncio.to_thread(runtime.batches.chunks.predict, [head], examples, options, lambda: False)
        runtime.batches.store.write_chunk(dead.holder, 0, first)
        with runtime.core.db.session() as session:  # the dead replica stops renewing: its lease runs out
            session.execute(
                update(BatchPredictionRow)
                .where(BatchPredictionRow.id == batch.id)
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )

        async def read(id: str) -> dict:
            return runtime.batches.get(TENANT, id).model_dump()

        done = await until_done(read, batch.id)
        with pytest.raises(LeaseLost):  # the dead replica, back, may no longer write
            runtime.batches.store.write_chunk(dead.holder, CHUNK, first)
        expected = await online(runtime, images, ["clothes"], top_k=3)
    finally:
        await runtime.stop()
    row = runtime.batches.store.get(TENANT, batch.id)
    rows = list(runtime.batches.store.results(TENANT, batch.id))
    assert done["state"] == JobState.SUCCEEDED and row.done_images == len(images)
    with runtime.core.db.session() as session:
        attempts = session.get_one(BatchPredictionRow, batch.id).attempts
    assert attempts == 2
    assert [r["index"] for r in rows] == list(range(len(images)))
    assert_same_answers(answered(rows), expected)


def test_a_second_replica_never_claims_a_job_another_holds(runtime):
    dataset_id = name_id(dataset_of(runtime, TENANT))
    asyncio.run(runtime.batches.create(TENANT, ["imagenet@mobilenet_v2"], dataset_id, BatchOptions()))
    other = BatchRunner(
        runtime.core.db,
        runtime.core.datasets,
        runtime.predictor.heads,
        runtime.core.backbones,
        runtime.core.blobs,
        runtime.settings,
        runtime.core.quotas,
        lambda: 0,
    )
    assert runtime.batches.store.claim_next("first", 30.0) is not None
    assert other.store.claim_next("second", 30.0) is None
    assert other.store.requeue_expired(3) == []


# -- the clients and the CLI ----------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("door", ["http", "grpc"])
async def test_both_clients_create_follow_list_download_and_delete_batch_predictions(runtime, keys, images, door):
    await runtime.start()
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        with serve_http(runtime) as port:
            client = (
                HttpClient(f"http://127.0.0.1:{port}", keys[TENANT])
                if door == "http"
                else GrpcClient(f"127.0.0.1:{server.port}", keys[TENANT])
            )
            with client:
                created = await asyncio.to_thread(
                    client.predict_dataset, dataset_of(runtime, TENANT), ["clothes:latest"], top_k=2
                )
                ended = await asyncio.to_thread(client.wait_batch_prediction, created.name, poll_s=0.05)
                listed = await asyncio.to_thread(client.list_batch_predictions)
                as_csv = await asyncio.to_thread(client.batch_prediction_results, created.name, "csv")
                as_jsonl = await asyncio.to_thread(client.batch_prediction_results, created.name)
                with pytest.raises(FailedPrecondition, match="already succeeded"):
                    await asyncio.to_thread(client.cancel_batch_prediction, created.name)
                await asyncio.to_thread(client.delete_batch_prediction, created.name)
                with pytest.raises(NotFound):
                    await asyncio.to_thread(client.get_batch_prediction, created.name)
    finally:
        await server.stop(None)
        await runtime.stop()
    assert (created.state, created.head_versions, created.spec.heads) == ("queued", ["clothes@1"], ["clothes:latest"])
    assert (ended.state, ended.images_done, ended.images_total, ended.error) == ("succeeded", 9, 9, None)
    assert [b.name for b in listed] == [created.name]
    rows = [json.loads(line) for line in as_jsonl.decode().splitlines()]
    table = list(csv.DictReader(io.StringIO(as_csv.decode())))
    assert [line["1:clothes:latest label"] for line in table] == [row["heads"][0]["label"] for row in rows]
    assert [int(line["index"]) for line in table] == list(range(len(images)))


@pytest.mark.anyio
async def test_graft_batch_creates_waits_lists_and_downloads_results(
    runtime, keys, images, monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setenv("GRAFT_API_KEY", keys[TENANT])
    await runtime.start()
    try:
        with serve_http(runtime) as port:
            url = f"http://127.0.0.1:{port}"

            def graft(*args: str) -> int:
                return cli.main(["--url", url, "batch", *args])

            assert await asyncio.to_thread(graft, "create", "clothes", "clothes,clothes@1", "--wait", "--json") == 0
            created = json.loads(capsys.readouterr().out)
            assert await asyncio.to_thread(graft, "list") == 0
            listed = capsys.readouterr().out.splitlines()
            out = tmp_path / "results.csv"
            assert await asyncio.to_thread(graft, "results", created["name"], "--format", "csv", "-o", str(out)) == 0
    finally:
        await runtime.stop()
    assert created["state"] == "succeeded" and created["head_versions"] == ["clothes@1", "clothes@1"]
    assert listed[0].split() == ["name", "state", "images", "heads", "created"]
    assert listed[1].split()[:4] == [created["name"], "succeeded", "9/9", "clothes@1,clothes@1"]
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(table) == len(images) and table[0]["2:clothes@1 version"] == "1"


@pytest.mark.anyio
async def test_a_batch_prediction_that_ends_queues_batch_prediction_finished_for_subscribed_webhooks(
    mobilenet, tmp_path, images
):
    runtime = make_runtime(mobilenet, tmp_path, webhook_allowed_networks="127.0.0.1/32")
    dataset = runtime.core.datasets.create(TENANT, "clothes", images)
    hook = runtime.webhooks.create(TENANT, "http://127.0.0.1:9/hooks", ["batch_prediction.finished"]).webhook
    deaf = runtime.webhooks.create(TENANT, "http://127.0.0.1:9/hooks", ["job.succeeded"]).webhook
    cancelled = await runtime.batches.create(TENANT, ["imagenet@mobilenet_v2"], dataset.id, BatchOptions())
    runtime.batches.cancel(TENANT, cancelled.id)  # queued: it ends at once
    finished = await runtime.batches.create(TENANT, ["imagenet@mobilenet_v2"], dataset.id, BatchOptions())
    await runtime.start()
    try:

        async def read(id: str) -> dict:
            return runtime.batches.get(TENANT, id).model_dump()

        await until_done(read, finished.id)
    finally:
        await runtime.stop()
    with runtime.core.db.session() as session:
        rows = session.scalars(
            select(WebhookDeliveryRow).where(WebhookDeliveryRow.webhook_id == hook.id).order_by(WebhookDeliveryRow.id)
        ).all()
        payloads = {row.payload["data"]["batch"]: row.payload for row in rows}
        deaf_rows = session.scalars(select(WebhookDeliveryRow).where(WebhookDeliveryRow.webhook_id == deaf.id)).all()
    assert {name: p["data"]["state"] for name, p in payloads.items()} == {
        f"batchPredictions/{cancelled.id}": "cancelled",
        f"batchPredictions/{finished.id}": "succeeded",
    }
    done = payloads[f"batchPredictions/{finished.id}"]
    assert done["type"] == "batch_prediction.finished"
    assert done["data"]["images_done"] == done["data"]["images_total"] == len(images)
    assert done["data"]["dataset"] == f"datasets/{dataset.id}" and deaf_rows == []


@pytest.mark.anyio
async def test_graft_batch_create_of_a_zip_uploads_it_unlabelled_and_predicts_every_image(
    runtime, keys, images, monkeypatch, capsys, tmp_path
):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data, _ in images:  # a flat zip: no class folders, no labels
            zf.writestr(name, data)
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setenv("GRAFT_API_KEY", keys[TENANT])
    await runtime.start()
    try:
        with serve_http(runtime) as port:
            argv = ["--url", f"http://127.0.0.1:{port}", "batch", "create", str(archive), "clothes", "--wait", "--json"]
            assert await asyncio.to_thread(cli.main, argv) == 0
    finally:
        await runtime.stop()
    printed = capsys.readouterr()
    created = json.loads(printed.out)
    assert created["state"] == "succeeded" and created["images_done"] == len(images)
    uploaded = created["spec"]["dataset"]
    assert f"uploaded as {uploaded}" in printed.err
    dataset = runtime.core.datasets.get(TENANT, uploaded.removeprefix("datasets/"))
    assert (dataset.name, dataset.num_unlabelled) == ("photos", len(images))
