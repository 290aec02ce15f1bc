"""End to end over real HTTP against a real ``bentoml serve`` process.

One server for the module: upload real textile JPEGs, train, watch, predict,
alias, export, delete; tenants are isolated; every kind of bad input gets its
status and message, and nothing is stored for it.
"""

import base64
import io
import json
import struct
import zipfile
import zlib

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from harness.sample_data import textile_files
from harness.servers import make_tenant_key, start_server

MAX_IMAGE_BYTES = 200_000
MAX_IMAGES = 300
MAX_UPLOAD = 8_000_000
METRICS_KEY = "metrics-key-7d1e4b9a2f6c8e0b3a5d7f9c1e3b5a7d"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("e2e-http"),
        GRAFT_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
        GRAFT_MAX_IMAGES_PER_DATASET=str(MAX_IMAGES),
        GRAFT_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        GRAFT_METRICS_KEY=METRICS_KEY,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alice(server) -> httpx.Client:
    key = make_tenant_key(server, "alice")
    with httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def bob(server) -> httpx.Client:
    key = make_tenant_key(server, "bob")
    with httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        yield client


def upload(client: httpx.Client, examples, name="textiles") -> httpx.Response:
    files = [("files", (file_name, data, "image/jpeg")) for file_name, data, _ in examples]
    return client.post(
        "/v1/datasets", data={"display_name": name, "labels": [label for _, _, label in examples]}, files=files
    )


def watch_until_done(client: httpx.Client, job: str) -> list[dict]:
    events = []
    with client.stream("GET", f"/v1/{job}:watch") as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    return events


@pytest.fixture(scope="module")
def trained(alice) -> dict:
    """A dataset and a head trained on it, shared by the tests that need one."""
    response = upload(alice, textile_files(per_class=24))
    assert response.status_code == 201, response.text
    dataset = response.json()
    job = alice.post("/v1/jobs", json={"dataset": dataset["name"], "head": "textiles"})
    assert job.status_code == 202, job.text
    events = watch_until_done(alice, job.json()["name"])
    return {"dataset": dataset, "job": job.json(), "events": events}


def test_uploaded_dataset_reports_examples_per_class(alice, trained):
    dataset = alice.get(f"/v1/{trained['dataset']['name']}").json()
    assert dataset["examples_per_class"] == {"global": 24, "local": 24, "nominal": 24}
    assert dataset["example_count"] == 72


def test_training_progress_is_visible_until_the_job_succeeds(trained):
    events = trained["events"]
    assert events[-1]["state"] == "succeeded", events[-1]
    progress = [event["progress"] for event in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert len(events) >= 3
    assert events[-1]["head_version"] == "heads/textiles/versions/1"


def test_predictions_on_held_out_images_beat_chance_by_far(alice, trained):
    held_out = textile_files(per_class=10, offset=200)
    files = [("files", (name, data, "image/jpeg")) for name, data, _ in held_out]
    response = alice.post("/v1/predict:upload", data={"heads": ["textiles"], "top_k": "1"}, files=files)
    assert response.status_code == 200, response.text
    predicted = [p["heads"][0]["top"][0]["label"] for p in response.json()["predictions"]]
    accuracy = sum(p == label for p, (_, _, label) in zip(predicted, held_out, strict=True)) / len(held_out)
    assert accuracy >= 0.55  # chance is 1/3


def test_json_predict_takes_base64_images_and_several_heads(alice, trained):
    _, data, _ = textile_files(per_class=1, offset=300)[0]
    body = {
        "images": [base64.b64encode(data).decode()],
        "heads": ["textiles", "textiles@1"],
        "top_k": 3,
        "include_embedding": True,
    }
    prediction = alice.post("/v1/predict", json=body).json()["predictions"][0]
    assert [h["head"] for h in prediction["heads"]] == ["textiles", "textiles"]
    assert len(prediction["heads"][0]["top"]) == 3
    assert abs(sum(s["score"] for s in prediction["heads"][0]["top"]) - 1) < 1e-4
    assert len(prediction["embedding"]) == 1280


def test_alias_moves_and_predictions_follow_it(alice, trained):
    job = alice.post(
        "/v1/jobs",
        json={
            "dataset": trained["dataset"]["name"],
            "head": "textiles",
            "search": {"lr": [1.0], "weight_decay": [0.01]},
        },
    )
    watch_until_done(alice, job.json()["name"])
    _, data, _ = textile_files(per_class=1, offset=301)[0]
    body = {"images": [base64.b64encode(data).decode()], "heads": ["textiles:prod"]}
    for version in (1, 2):
        assert alice.put("/v1/heads/textiles/aliases/prod", json={"version": version}).status_code == 200
        assert alice.post("/v1/predict", json=body).json()["predictions"][0]["heads"][0]["version"] == version
    head = alice.get("/v1/heads/textiles").json()
    assert head["aliases"]["prod"] == 2 and head["latest_version"] == 2


def test_export_gives_safetensors_and_a_standalone_pt2_model_with_its_class_names(alice, trained):
    weights = alice.get("/v1/heads/textiles@1:export")
    assert weights.status_code == 200
    assert "linear.weight" in load_safetensors(weights.content)
    exported = alice.get("/v1/heads/textiles@1:export", params={"format": "pt2"})
    assert exported.status_code == 200, exported.text
    extra = {"graft.json": ""}
    program = torch.export.load(io.BytesIO(exported.content), extra_files=extra)
    (probabilities,) = program.module()(torch.randn(2, 3, 224, 224))
    assert probabilities.shape == (2, 3)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2))
    assert json.loads(extra["graft.json"])["outputs"][0]["classes"] == ["global", "local", "nominal"]


def test_deleting_a_head_makes_it_unknown(alice, trained):
    alice.post(
        "/v1/jobs",
        json={
            "dataset": trained["dataset"]["name"],
            "head": "short-lived",
            "search": {"lr": [1.0], "weight_decay": [0.01]},
        },
    )
    job = alice.get("/v1/jobs").json()["jobs"][0]
    watch_until_done(alice, job["name"])
    assert alice.delete("/v1/heads/short-lived").status_code == 204
    assert alice.get("/v1/heads/short-lived").status_code == 404


def test_tenants_cannot_see_or_use_each_others_resources(alice, bob, trained):
    dataset = trained["dataset"]["name"]
    assert bob.get(f"/v1/{dataset}").status_code == 404
    assert bob.get(f"/v1/{trained['job']['name']}").status_code == 404
    assert bob.get("/v1/heads/textiles").status_code == 404
    assert bob.post("/v1/jobs", json={"dataset": dataset, "head": "stolen"}).status_code == 404
    _, data, _ = textile_files(per_class=1)[0]
    body = {"images": [base64.b64encode(data).decode()], "heads": ["textiles"]}
    assert bob.post("/v1/predict", json=body).status_code == 404
    assert bob.delete(f"/v1/{dataset}").status_code == 404
    assert bob.get("/v1/datasets").json()["datasets"] == []
    assert alice.get(f"/v1/{dataset}").status_code == 200


def test_missing_or_wrong_api_key_is_unauthenticated(server):
    missing = httpx.get(f"{server.http_url}/v1/datasets")
    assert missing.status_code == 401 and "missing API key" in missing.json()["message"]
    wrong = httpx.get(f"{server.http_url}/v1/datasets", headers={"Authorization": "Bearer graft_nope_nope"})
    assert wrong.status_code == 401 and wrong.json()["code"] == "unauthenticated"


def test_admin_endpoints_need_the_admin_key(alice, server):
    assert alice.post("/v1/admin/tenants", json={"name": "mallory"}).status_code == 403


def test_health_and_openapi_are_served(server):
    assert httpx.get(f"{server.http_url}/livez").status_code == 200
    assert httpx.get(f"{server.http_url}/readyz").status_code == 200
    paths = httpx.get(f"{server.http_url}/openapi.json").json()["paths"]
    for path in ("/v1/datasets", "/v1/jobs", "/v1/jobs/{job}:watch", "/v1/heads/{head}", "/v1/predict"):
        assert path in paths


def test_metrics_count_predictions_and_batches(alice, trained, server):
    _, data, _ = textile_files(per_class=1, offset=302)[0]
    alice.post("/v1/predict", json={"images": [base64.b64encode(data).decode()], "heads": ["textiles"]})
    metrics = scrape(server)
    assert "graft_predictions_total" in metrics and "graft_batch_size" in metrics


def scrape(server) -> str:
    response = httpx.get(f"{server.http_url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert response.status_code == 200, response.text
    return response.text


def series(metrics: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in metrics.splitlines() if line and not line.startswith("#")}


def test_metrics_carry_no_tenant_data_and_do_not_grow_with_request_paths(alice, server):
    """/metrics needs its own key, and its series neither name tenants' heads nor grow with request paths."""
    alice.get("/v1/heads/textiles")  # a tenant's head name in a path
    for i in range(5):
        httpx.get(f"{server.http_url}/probe-{i}")
    before = series(scrape(server))
    for i in range(50):
        httpx.get(f"{server.http_url}/no-such-path-{i}")
        httpx.get(f"{server.http_url}/v1/heads/secret-head-{i}")  # unauthenticated: 401, under its template
    alice.get("/v1/heads/textiles")
    after = scrape(server)
    assert "textiles" not in after and "secret-head" not in after and "no-such-path" not in after
    grown = series(after) - before
    assert len(grown) <= 20, sorted(grown)  # a few new (route, status) pairs at most, never one per path
    assert 'route="/v1/heads/{head}"' in after

    assert httpx.get(f"{server.http_url}/metrics").status_code == 401
    wrong = httpx.get(f"{server.http_url}/metrics", headers={"Authorization": "Bearer " + "x" * 40})
    assert wrong.status_code == 403


# --- bad input: a clear 4xx, and nothing stored -------------------------------------------------


def png_bytes(size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header claims 10 gigapixels."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


GOOD = [("a.png", png_bytes(), "red"), ("b.png", png_bytes((20, 20)), "blue")]
JPEG = textile_files(per_class=1)[0][1]

BAD_UPLOADS = {
    "corrupt image": ([("x.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "red")] + GOOD, 400, "x.png"),
    "truncated jpeg": ([("cut.jpg", JPEG[: len(JPEG) // 2], "red")] + GOOD, 400, "cut.jpg"),
    "not an image": ([("notes.txt", b"hello, world", "red")] + GOOD, 400, "notes.txt"),
    "zero bytes": ([("empty.png", b"", "red")] + GOOD, 400, "empty"),
    "decompression bomb": ([("bomb.png", bomb_png(), "red")] + GOOD, 400, "too many pixels"),
    "image too large": ([("big.png", b"\x89PNG" + b"\0" * (MAX_IMAGE_BYTES + 1), "red")] + GOOD, 400, "over the limit"),
    "single class": ([("a.png", png_bytes(), "red"), ("b.png", png_bytes((8, 8)), "red")], 400, "only one class"),
    "too many files": ([(f"{i}.png", png_bytes((4, 4)), "ab"[i % 2]) for i in range(MAX_IMAGES + 1)], 400, "limit"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_upload_is_rejected_and_nothing_is_stored(alice, case):
    examples, status, message = BAD_UPLOADS[case]
    before = alice.get("/v1/datasets").json()["datasets"]
    response = upload(alice, examples, name=f"bad-{case}")
    assert response.status_code == status, response.text
    assert message in response.json()["message"]
    assert alice.get("/v1/datasets").json()["datasets"] == before


def test_labels_that_do_not_match_files_are_rejected(alice):
    files = [("files", (name, data, "image/png")) for name, data, _ in GOOD]
    response = alice.post("/v1/datasets", data={"display_name": "x", "labels": ["red"]}, files=files)
    assert response.status_code == 400 and "1 labels for 2 files" in response.json()["message"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"red/a.png": png_bytes(), "blue/": b""}, "has no examples"),
        ({"red/a.png": png_bytes(), "../blue/b.png": png_bytes()}, ".."),
        ({"red/a.png": png_bytes(), "/abs/blue/b.png": png_bytes()}, "absolute"),
    ],
)
def test_bad_zip_archive_is_rejected_and_nothing_is_stored(alice, entries, message):
    before = alice.get("/v1/datasets").json()["datasets"]
    response = alice.post(
        "/v1/datasets", data={"display_name": "zip"}, files={"archive": ("d.zip", zip_bytes(entries))}
    )
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]
    assert alice.get("/v1/datasets").json()["datasets"] == before


def test_upload_over_the_size_limit_is_refused_before_reading(alice):
    response = alice.post(
        "/v1/datasets", data={"display_name": "huge"}, files={"archive": ("d.zip", b"\0" * (MAX_UPLOAD + 1))}
    )
    assert response.status_code == 413 and "over the limit" in response.json()["message"]


def test_unknown_resources_are_not_found(alice):
    assert alice.get("/v1/datasets/ds_0000").status_code == 404
    assert alice.get("/v1/jobs/job_0000").status_code == 404
    assert alice.get("/v1/heads/nobody").status_code == 404
    assert alice.get("/v1/backbones/resnet9000").status_code == 404
    body = {"images": [base64.b64encode(png_bytes()).decode()], "heads": ["nobody"]}
    assert alice.post("/v1/predict", json=body).status_code == 404


def test_malformed_json_is_a_clear_422(alice):
    response = alice.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["code"] == "invalid_argument"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hyperparams": {"lr": float("nan"), "weight_decay": 0.0, "epochs": 5, "batch_size": 32}}, "lr"),
        ({"search": {"lr": [-1.0], "weight_decay": [0.1]}}, "lr"),
        ({"holdout_fraction": 1.5}, "holdout_fraction"),
        ({"kind": "finetune", "finetune_blocks": 99}, "finetune_blocks"),
        ({"backbone": "resnet9000"}, "resnet9000"),
        ({"head": "Bad Name!"}, "head"),
    ],
)
def test_bad_training_requests_are_rejected_before_a_job_exists(alice, trained, override, message):
    jobs_before = len(alice.get("/v1/jobs").json()["jobs"])
    body = json.dumps({"dataset": trained["dataset"]["name"], "head": "bad", **override})  # NaN stays NaN
    response = alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert message in response.text
    assert len(alice.get("/v1/jobs").json()["jobs"]) == jobs_before


def test_hyperparams_may_override_one_field_and_the_kind_defaults_fill_the_rest(alice, trained):
    body = {
        "dataset": trained["dataset"]["name"],
        "head": "partial",
        "hyperparams": {"epochs": 3},
        "search": {"lr": [1.0], "weight_decay": [0.01]},
    }
    response = alice.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    overrides = response.json()["spec"]["hyperparams"]
    assert {field: value for field, value in overrides.items() if value is not None} == {"epochs": 3}  # null: unset
    assert watch_until_done(alice, response.json()["name"])[-1]["state"] == "succeeded"


def test_bad_predict_requests_are_rejected(alice, trained):
    assert alice.post("/v1/predict", json={"images": ["***"], "heads": ["textiles"]}).status_code == 422  # schema
    body = {"images": [base64.b64encode(b"not an image").decode()], "heads": ["textiles"]}
    response = alice.post("/v1/predict", json=body)
    assert response.status_code == 400 and "image 0" in response.json()["message"]
    body = {"images": [base64.b64encode(png_bytes()).decode()], "heads": ["textiles"], "top_k": 0}
    assert alice.post("/v1/predict", json=body).status_code == 422  # the schema says 1..1000
