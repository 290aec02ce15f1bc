"""Both doors against one real ``bentoml serve`` with tight limits and quotas: what a hostile or careless
tenant meets. One server for the module (each costs ~20-30 s of start-up)."""

import io
import socket
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
from PIL import Image

from harness.servers import make_tenant_key, start_server
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc

MAX_JSON = 100_000
MAX_UPLOAD = 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("e2e-doors"),
        GRAFT_MAX_JSON_BYTES=str(MAX_JSON),
        GRAFT_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        GRAFT_QUOTA_DATASETS="1",
        GRAFT_QUOTA_PREDICT_BURST="2",
        GRAFT_QUOTA_PREDICT_IMAGES_PER_S="0.01",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(server) -> str:
    return make_tenant_key(server, "erin")


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


def chunks(total: int, size: int = 10_000):
    """A body sent chunked (no Content-Length)."""
    for _ in range(total // size):
        yield b"x" * size


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_a_chunked_body_over_the_limit_without_a_key_is_401(server):
    response = httpx.post(
        f"{server.http_url}/v1/jobs", content=chunks(10 * MAX_JSON), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401 and response.json()["code"] == "unauthenticated"


def test_a_chunked_body_over_the_limit_with_a_key_is_413(server, key):
    response = httpx.post(
        f"{server.http_url}/v1/jobs",
        content=chunks(10 * MAX_JSON),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 413, response.text
    assert "GRAFT_MAX_JSON_BYTES" in response.json()["message"]


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_sent(server, key):
    """Only the head is sent: a server that waited for the body would never answer."""
    url = urlsplit(server.http_url)
    head = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {10 * MAX_UPLOAD}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head.encode())
        answer = sock.makefile("rb")
        status = answer.readline().decode()
        headers = dict(line.decode().strip().lower().split(": ", 1) for line in iter(answer.readline, b"\r\n"))
        body = answer.read(int(headers["content-length"])).decode()
    assert status.startswith("HTTP/1.1 413"), status
    assert "GRAFT_MAX_UPLOAD_BYTES" in body


def test_a_tenant_over_its_dataset_quota_gets_429_over_http_and_resource_exhausted_over_grpc(server, key, channel):
    files = [("files", ("a.png", png("red"), "image/png")), ("files", ("b.png", png("blue"), "image/png"))]
    http = httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    first = http.post("/v1/datasets", data={"display_name": "one", "labels": ["red", "blue"]}, files=files)
    assert first.status_code == 201, first.text
    second = http.post("/v1/datasets", data={"display_name": "two", "labels": ["red", "blue"]}, files=files)
    assert second.status_code == 429 and "GRAFT_QUOTA_DATASETS" in second.json()["message"]

    def stream():
        yield api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name="three"))
        for name, colour in (("a.png", "red"), ("b.png", "blue")):
            yield api.CreateDatasetRequest(
                image=api.CreateDatasetRequest.Image(file_name=name, label=colour, data=png(colour))
            )

    with pytest.raises(grpc.RpcError) as error:
        rpc.DatasetServiceStub(channel).CreateDataset(stream(), metadata=[("authorization", f"Bearer {key}")])
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "GRAFT_QUOTA_DATASETS" in error.value.details()


def test_a_tenant_over_its_prediction_rate_is_told_when_to_retry_over_both_doors(server, channel):
    key = make_tenant_key(server, "frank")  # a full bucket of 2 images, refilled at 0.01 image/s
    images = [png("red")] * 3
    http = httpx.post(
        f"{server.http_url}/v1/predict:upload",
        headers={"Authorization": f"Bearer {key}"},
        files=[("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)],
        data={"heads": ["any"]},
    )
    assert http.status_code == 429, http.text
    assert int(http.headers["Retry-After"]) >= 1 and "GRAFT_QUOTA_PREDICT_IMAGES_PER_S" in http.json()["message"]

    with pytest.raises(grpc.RpcError) as error:
        rpc.PredictionServiceStub(channel).Predict(
            api.PredictRequest(images=images, heads=["any"]), metadata=[("authorization", f"Bearer {key}")]
        )
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(error.value.trailing_metadata())["retry-after"]) >= 1
