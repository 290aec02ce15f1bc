"""End to end over real gRPC against a real ``bentoml serve`` (HTTP and gRPC in one worker)."""

import base64
import io
import json
import math

import grpc
import httpx
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from safetensors.torch import load as load_safetensors

from harness.sample_data import textile_files
from harness.servers import make_tenant_key, start_server
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc

QUICK = pb.SearchSpace(lr=[1.0], weight_decay=[0.01])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("e2e-grpc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="module")
def keys(server) -> dict[str, str]:
    return {name: make_tenant_key(server, name) for name in ("carol", "dave")}


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def upload_stream(examples, display_name="textiles"):
    yield api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name=display_name))
    for file_name, data, label in examples:
        yield api.CreateDatasetRequest(
            image=api.CreateDatasetRequest.Image(file_name=file_name, label=label, data=data)
        )


def train(channel, key: str, dataset: str, head: str) -> pb.Job:
    jobs = rpc.JobServiceStub(channel)
    job = jobs.CreateJob(
        api.CreateJobRequest(spec=pb.TrainingSpec(dataset=dataset, head=head, search=QUICK)), metadata=auth(key)
    )
    return list(jobs.WatchJob(api.WatchJobRequest(name=job.name), metadata=auth(key)))


@pytest.fixture(scope="module")
def trained(channel, keys):
    datasets = rpc.DatasetServiceStub(channel)
    dataset = datasets.CreateDataset(upload_stream(textile_files(per_class=16)), metadata=auth(keys["carol"]))
    updates = train(channel, keys["carol"], dataset.name, "weave")
    return {"dataset": dataset, "updates": updates}


def test_stream_uploaded_dataset_counts_its_classes(trained):
    assert dict(trained["dataset"].examples_per_class) == {"global": 16, "local": 16, "nominal": 16}


def test_watch_job_streams_progress_until_it_succeeds(trained):
    updates = trained["updates"]
    assert updates[-1].state == pb.Job.SUCCEEDED and updates[-1].done
    assert updates[-1].head_version == "heads/weave/versions/1"
    progress = [u.progress for u in updates]
    assert progress == sorted(progress) and progress[-1] == 1.0


def test_unary_predict_answers_per_image_per_head(channel, keys, trained):
    images = [data for _, data, _ in textile_files(per_class=2, offset=300)]
    response = rpc.PredictionServiceStub(channel).Predict(
        api.PredictRequest(images=images, heads=["weave", "weave@1"], top_k=2, include_embedding=True),
        metadata=auth(keys["carol"]),
        timeout=60,
    )
    assert len(response.predictions) == len(images)
    first = response.predictions[0]
    assert [h.head for h in first.heads] == ["weave", "weave"] and len(first.heads[0].top) == 2
    assert len(first.embedding) == 1280


def test_stream_predict_answers_every_request_and_reports_bad_images_in_band(channel, keys, trained):
    images = [data for _, data, _ in textile_files(per_class=2, offset=310)]
    requests = [
        api.StreamPredictRequest(request_id=f"r{i}", image=data, heads=["weave"]) for i, data in enumerate(images)
    ]
    requests.append(api.StreamPredictRequest(request_id="bad", image=b"not an image", heads=["weave"]))
    responses = {
        r.request_id: r
        for r in rpc.PredictionServiceStub(channel).StreamPredict(iter(requests), metadata=auth(keys["carol"]))
    }
    assert set(responses) == {f"r{i}" for i in range(len(images))} | {"bad"}
    assert all(responses[f"r{i}"].prediction.heads[0].top for i in range(len(images)))
    assert responses["bad"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a decodable image" in responses["bad"].error_message


def test_alias_export_and_delete(channel, keys, trained):
    heads = rpc.HeadServiceStub(channel)
    head = heads.SetAlias(
        api.SetAliasRequest(name="heads/weave", alias="prod", version=1), metadata=auth(keys["carol"])
    )
    assert head.aliases["prod"] == 1
    chunks = heads.ExportHead(api.ExportHeadRequest(head="weave:prod"), metadata=auth(keys["carol"]))
    assert "linear.weight" in load_safetensors(b"".join(c.chunk for c in chunks))
    request = api.ExportHeadRequest(head="weave:prod", format=api.EXPORT_FORMAT_ONNX)
    model = onnx.load_from_string(b"".join(c.chunk for c in heads.ExportHead(request, metadata=auth(keys["carol"]))))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["graft.json"])
    assert (meta["outputs"][0]["head"], meta["outputs"][0]["version"]) == ("weave", 1)

    train(channel, keys["carol"], trained["dataset"].name, "temporary")
    heads.DeleteHead(api.DeleteHeadRequest(name="heads/temporary"), metadata=auth(keys["carol"]))
    with pytest.raises(grpc.RpcError) as error:
        heads.GetHead(api.GetHeadRequest(name="heads/temporary"), metadata=auth(keys["carol"]))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_head_trained_over_http_predicts_over_grpc_and_the_reverse(server, channel, keys, trained):
    http = httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {keys['carol']}"}, timeout=120)
    job = http.post(
        "/v1/jobs",
        json={"dataset": trained["dataset"].name, "head": "from-http", "search": {"lr": [1.0], "weight_decay": [0.01]}},
    ).json()
    with http.stream("GET", f"/v1/{job['name']}:watch") as events:
        for _ in events.iter_lines():
            pass
    _, data, _ = textile_files(per_class=1, offset=320)[0]
    over_grpc = rpc.PredictionServiceStub(channel).Predict(
        api.PredictRequest(images=[data], heads=["from-http"]), metadata=auth(keys["carol"])
    )
    over_http = http.post("/v1/predict", json={"images": [base64.b64encode(data).decode()], "heads": ["weave"]})
    assert over_grpc.predictions[0].heads[0].head == "from-http"
    assert over_http.json()["predictions"][0]["heads"][0]["head"] == "weave"


def test_tenants_are_isolated(channel, keys, trained):
    other = auth(keys["dave"])
    for call, request in (
        (rpc.DatasetServiceStub(channel).GetDataset, api.GetDatasetRequest(name=trained["dataset"].name)),
        (rpc.HeadServiceStub(channel).GetHead, api.GetHeadRequest(name="heads/weave")),
        (rpc.PredictionServiceStub(channel).Predict, api.PredictRequest(images=[b"x"], heads=["weave"])),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call(request, metadata=other)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(rpc.DatasetServiceStub(channel).ListDatasets(api.ListDatasetsRequest(), metadata=other).datasets) == 0


def test_health_is_serving_and_reflection_lists_graft_services(channel):
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="graft.v1.PredictionService")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [answer] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {
        "graft.v1.DatasetService",
        "graft.v1.JobService",
        "graft.v1.HeadService",
        "graft.v1.PredictionService",
        "graft.v1.BackboneService",
    } <= names


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="PNG")
    return buf.getvalue()


def expect(code: grpc.StatusCode, call, request, metadata, text: str = "") -> None:
    with pytest.raises(grpc.RpcError) as error:
        result = call(request, metadata=metadata)
        list(result) if hasattr(result, "__iter__") else None
    assert error.value.code() == code, error.value.details()
    assert text in error.value.details()


def test_bad_inputs_get_the_right_status_codes(channel, keys, trained):
    me = auth(keys["carol"])
    datasets, jobs = rpc.DatasetServiceStub(channel), rpc.JobServiceStub(channel)
    predict = rpc.PredictionServiceStub(channel).Predict
    expect(grpc.StatusCode.UNAUTHENTICATED, datasets.ListDatasets, api.ListDatasetsRequest(), None, "missing API key")
    expect(grpc.StatusCode.UNAUTHENTICATED, datasets.ListDatasets, api.ListDatasetsRequest(), auth("graft_bad_key"))
    corrupt = [("a.png", png(), "red"), ("b.png", b"\x89PNG garbage", "blue")]
    expect(grpc.StatusCode.INVALID_ARGUMENT, datasets.CreateDataset, upload_stream(corrupt), me, "b.png")
    single = [("a.png", png(), "red"), ("b.png", png(), "red")]
    expect(grpc.StatusCode.INVALID_ARGUMENT, datasets.CreateDataset, upload_stream(single), me, "only one class")
    expect(grpc.StatusCode.NOT_FOUND, datasets.GetDataset, api.GetDatasetRequest(name="datasets/ds_0"), me)
    expect(grpc.StatusCode.NOT_FOUND, predict, api.PredictRequest(images=[png()], heads=["nobody"]), me)
    expect(
        grpc.StatusCode.INVALID_ARGUMENT, predict, api.PredictRequest(images=[b"text"], heads=["weave"]), me, "image 0"
    )
    nan = pb.TrainingSpec(
        dataset=trained["dataset"].name,
        head="nan",
        hyperparams=pb.HyperParams(lr=math.nan, weight_decay=0, epochs=5, batch_size=8),
    )
    expect(grpc.StatusCode.INVALID_ARGUMENT, jobs.CreateJob, api.CreateJobRequest(spec=nan), me, "lr")
    negative = pb.TrainingSpec(
        dataset=trained["dataset"].name, head="neg", search=pb.SearchSpace(lr=[-1], weight_decay=[0])
    )
    expect(grpc.StatusCode.INVALID_ARGUMENT, jobs.CreateJob, api.CreateJobRequest(spec=negative), me, "lr")
    expect(grpc.StatusCode.NOT_FOUND, jobs.GetJob, api.GetJobRequest(name="jobs/job_0"), me)
    assert len(datasets.ListDatasets(api.ListDatasetsRequest(), metadata=me).datasets) == 1  # nothing stored


def test_a_malformed_protobuf_is_refused_and_the_server_keeps_serving(channel, keys):
    raw = channel.unary_unary(
        "/graft.v1.PredictionService/Predict", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as error:
        raw(b"\xff\xff\xff\xff not a protobuf", metadata=auth(keys["carol"]))
    # grpc.aio rejects it before graft's code runs, as UNKNOWN with a message naming the problem.
    assert error.value.code() == grpc.StatusCode.UNKNOWN
    assert "Error parsing message with type 'graft.v1.PredictRequest'" in error.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
