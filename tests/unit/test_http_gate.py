"""The HTTP door in-process (the real app and runtime, no backbone): the gate, bounds on values, error bodies.

httpx's ASGI transport pulls the request body from the client only when the app
receives it, so these tests can tell how much of a body the server read.
"""

import asyncio
import io
import json
import re
import threading

import httpx
import jsonschema_rs
import pytest
from fastapi import APIRouter
from PIL import Image
from sqlalchemy import event

from service.config import Settings
from service.errors import DeadlineExceeded, InvalidArgument, PayloadTooLarge, ResourceExhausted, Unavailable
from service.http import datasets, predict
from service.http.app import create_app
from service.http.deps import IDEMPOTENCY_KEY_PATTERN
from service.http.errors import error_response
from service.resources import MAX_FINETUNE_BLOCKS, decimal_pattern
from service.runtime import Runtime
from service.store.requests import check_key
from service.training import FeatureMemory, TrainingCost

pytestmark = pytest.mark.anyio

MAX_JSON = 600
MAX_REQUEST = 1000
MAX_UPLOAD = 5000


class Body:
    """A chunked request body (no Content-Length) that counts how many of its bytes were pulled."""

    def __init__(self, total: int, chunk: int = 100, start: bytes = b"") -> None:
        self.total, self.chunk, self.start, self.pulled = total, chunk, start, 0

    async def __aiter__(self):
        if self.start:
            self.pulled += len(self.start)
            yield self.start
        while self.pulled < self.total:
            self.pulled += self.chunk
            yield b"x" * self.chunk


# The start of a multipart body whose one file part goes on for as long as the client likes.
ENDLESS_ZIP_PART = (
    b'--b\r\nContent-Disposition: form-data; name="archive"; filename="d.zip"\r\nContent-Type: application/zip\r\n\r\n'
)


@pytest.fixture
def runtime(tmp_path) -> Runtime:
    settings = Settings(
        data_dir=tmp_path,
        auth="keys",
        backbones=[],
        max_json_bytes=MAX_JSON,
        max_request_bytes=MAX_REQUEST,
        max_upload_bytes=MAX_UPLOAD,
        quota_datasets=1,
        max_images_per_dataset=1500,
    )
    return Runtime.open(settings)


@pytest.fixture
def key(runtime) -> str:
    runtime.tenants.create_tenant("acme")
    return runtime.tenants.create_key("acme").secret


@pytest.fixture
async def client(runtime):
    app = create_app(runtime.settings, lambda: runtime)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- authenticated first, bounded while streaming -----------------------------------------------------


async def test_a_chunked_body_without_a_key_is_refused_before_a_byte_is_read(client):
    body = Body(10 * MAX_UPLOAD)
    response = await client.post("/v1/datasets", content=body)
    assert response.status_code == 401 and response.json()["code"] == "unauthenticated"
    assert body.pulled == 0


async def test_a_chunked_body_is_refused_with_413_as_it_crosses_the_limit(client, key):
    body = Body(100 * MAX_REQUEST)
    response = await client.post("/v1/jobs", content=body, headers={**bearer(key), "Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "payload_too_large"
    assert "GRAFT_MAX_JSON_BYTES" in response.json()["message"]
    assert body.pulled <= MAX_JSON + body.chunk


async def test_a_json_prediction_is_bounded_more_tightly_than_a_multipart_one(client, key):
    """JSON is parsed in one piece on the event loop, where no other call moves meanwhile: a JSON body
    stops at GRAFT_MAX_JSON_BYTES, while a multipart prediction, parsed part by part, may be larger."""
    json_body = Body(10 * MAX_REQUEST)
    headers = {**bearer(key), "Content-Type": "application/json"}
    response = await client.post("/v1/predict", content=json_body, headers=headers)
    assert response.status_code == 413 and "GRAFT_MAX_JSON_BYTES" in response.json()["message"]
    assert json_body.pulled <= MAX_JSON + json_body.chunk
    multipart = Body(MAX_REQUEST - 100, start=ENDLESS_ZIP_PART)
    headers = {**bearer(key), "Content-Type": "multipart/form-data; boundary=b"}
    response = await client.post("/v1/predict:upload", content=multipart, headers=headers)
    assert response.status_code in (400, 422), response.text  # read whole, then refused for what it holds
    assert multipart.pulled > MAX_JSON
    over = Body(10 * MAX_REQUEST, start=ENDLESS_ZIP_PART)
    response = await client.post("/v1/predict:upload", content=over, headers=headers)
    assert response.status_code == 413 and "GRAFT_MAX_REQUEST_BYTES" in response.json()["message"]


async def test_a_dataset_upload_may_be_larger_than_other_requests_up_to_its_own_limit(client, key):
    body = Body(100 * MAX_UPLOAD, start=ENDLESS_ZIP_PART)
    response = await client.post(
        "/v1/datasets", content=body, headers={**bearer(key), "Content-Type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413 and "GRAFT_MAX_UPLOAD_BYTES" in response.json()["message"]
    assert MAX_REQUEST < body.pulled <= MAX_UPLOAD + body.chunk


async def test_a_declared_length_over_the_limit_is_refused_without_reading(client, key):
    body = Body(2 * MAX_REQUEST)
    headers = {**bearer(key), "Content-Length": str(2 * MAX_REQUEST), "Content-Type": "application/json"}
    response = await client.post("/v1/jobs", content=body, headers=headers)
    assert response.status_code == 413 and "2,000 bytes" in response.json()["message"]
    assert body.pulled == 0


async def test_the_admin_routes_need_the_admin_key_before_the_body_is_read(client, key):
    body = Body(MAX_REQUEST)
    response = await client.post("/v1/admin/tenants", content=body, headers=bearer(key))
    assert response.status_code in (403, 409) and body.pulled == 0  # 409: no admin key configured at all


async def test_a_prediction_on_a_full_replica_is_refused_with_429_before_its_body_is_read(runtime, client, key):
    """A flood of retries must cost the server a header each, not a JSON parse: refused at the gate."""
    headers = {**bearer(key), "Content-Type": "application/json"}
    with runtime.predictor.holding(runtime.settings.max_queue_images):
        for path in ("/v1/predict", "/v1/predict:upload"):
            body = Body(MAX_REQUEST // 2)
            response = await client.post(path, content=body, headers=headers)
            assert response.status_code == 429, response.text
            assert "GRAFT_MAX_QUEUE_IMAGES" in response.json()["message"] and response.headers["Retry-After"] == "1"
            assert body.pulled == 0
    body = Body(MAX_REQUEST // 2)
    response = await client.post("/v1/predict", content=body, headers=headers)
    assert response.status_code == 422 and body.pulled > 0  # room again: read, and refused for what it says


async def test_a_prediction_route_moved_to_another_path_keeps_its_checks_before_the_body(runtime, key, monkeypatch):
    """The gate finds the prediction routes on predict.py's router, not by copied paths: moved, both are still
    refused unread on a full replica, and the multipart one keeps its larger limit."""
    moved = APIRouter(prefix="/v1/moved")
    for route in predict.router.routes:
        moved.add_api_route(route.path.removeprefix("/v1"), route.endpoint, methods=list(route.methods))
    monkeypatch.setattr(predict, "router", moved)
    app = create_app(runtime.settings, lambda: runtime)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        json_headers = {**bearer(key), "Content-Type": "application/json"}
        with runtime.predictor.holding(runtime.settings.max_queue_images):
            for path in ("/v1/moved/predict", "/v1/moved/predict:upload"):
                body = Body(MAX_REQUEST // 2)
                response = await client.post(path, content=body, headers=json_headers)
                assert response.status_code == 429 and body.pulled == 0, (path, response.text)
        over = Body(10 * MAX_REQUEST, start=ENDLESS_ZIP_PART)
        headers = {**bearer(key), "Content-Type": "multipart/form-data; boundary=b"}
        response = await client.post("/v1/moved/predict:upload", content=over, headers=headers)
        assert response.status_code == 413 and "GRAFT_MAX_REQUEST_BYTES" in response.json()["message"]
        assert MAX_JSON < over.pulled <= MAX_REQUEST + over.chunk


async def test_a_dataset_upload_route_moved_to_another_path_keeps_its_own_limit(runtime, key, monkeypatch):
    """The gate knows an upload as the datasets router's form route, not by its path: moved, its body may still
    grow past the other limits up to GRAFT_MAX_UPLOAD_BYTES."""
    moved = APIRouter(prefix="/v1/moved-datasets")
    for route in datasets.router.routes:
        moved.add_api_route(route.path.removeprefix("/v1/datasets"), route.endpoint, methods=list(route.methods))
    monkeypatch.setattr(datasets, "router", moved)
    app = create_app(runtime.settings, lambda: runtime)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        body = Body(100 * MAX_UPLOAD, start=ENDLESS_ZIP_PART)
        headers = {**bearer(key), "Content-Type": "multipart/form-data; boundary=b"}
        response = await client.post("/v1/moved-datasets", content=body, headers=headers)
    assert response.status_code == 413 and "GRAFT_MAX_UPLOAD_BYTES" in response.json()["message"]
    assert MAX_REQUEST < body.pulled <= MAX_UPLOAD + body.chunk


async def test_documentation_needs_no_key(client):
    assert (await client.get("/openapi.json")).status_code == 200


async def test_authentication_does_not_hold_the_event_loop(runtime, client, key):
    """The key lookup waits until the loop itself releases it: a lookup on the loop would time out."""
    entered, release, released = threading.Event(), threading.Event(), []

    def wait_for_the_loop(*_):
        entered.set()
        released.append(release.wait(timeout=5))

    event.listen(runtime.core.db.engine, "before_cursor_execute", wait_for_the_loop)
    try:
        call = asyncio.ensure_future(client.get("/v1/backbones", headers=bearer(key)))
        while not entered.is_set():
            await asyncio.sleep(0.01)  # the loop gets here only while it is free
        release.set()
        assert (await call).status_code == 200
    finally:
        event.remove(runtime.core.db.engine, "before_cursor_execute", wait_for_the_loop)
    assert released and all(released)


# -- values out of range are 4xx ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["100000000000000000000", "2147483648", "0", "%C2%B2"])
async def test_a_version_outside_1_to_2_pow_31_is_a_client_error(client, key, version):
    response = await client.delete(f"/v1/heads/h/versions/{version}", headers=bearer(key))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_argument"


@pytest.mark.parametrize("version", [1e20, 2**31, 2**70])
async def test_an_alias_target_outside_32_bits_is_a_client_error(client, key, version):
    response = await client.put("/v1/heads/h/aliases/prod", json={"version": version}, headers=bearer(key))
    assert response.status_code == 422, response.text


async def test_control_characters_in_a_path_are_a_client_error(client, key):
    response = await client.get("/v1/datasets/ds%00x", headers=bearer(key))
    assert response.status_code == 400 and "control characters" in response.json()["message"]


async def test_a_head_reference_with_control_characters_is_a_client_error(client, key):
    response = await client.post("/v1/predict", json={"images": ["eA=="], "heads": ["h\u0000"]}, headers=bearer(key))
    assert response.status_code == 422, response.text


# The schema admits what the server accepts: a version from 1 to 2^31-1, written without a leading zero.
@pytest.mark.parametrize("ref", ["h@0", "h@00", "h@007", "h@2147483648", "h@9999999999"])
async def test_a_head_reference_to_no_version_there_can_be_is_refused_by_the_schema(client, key, ref):
    export = await client.get(f"/v1/heads/{ref}:export", headers=bearer(key))
    assert export.status_code == 422 and export.json()["details"]["problems"][0]["field"] == "path.head"
    predict = await client.post("/v1/predict", json={"images": ["eA=="], "heads": [ref]}, headers=bearer(key))
    assert predict.status_code == 422 and predict.json()["details"]["problems"][0]["field"] == "body.heads.0"


@pytest.mark.parametrize("ref", ["h@1", "h@10", "h@2147483647", "h:prod", "h"])
async def test_a_head_reference_within_the_schema_reaches_the_lookup(client, key, ref):
    response = await client.get(f"/v1/heads/{ref}:export", headers=bearer(key))
    assert response.status_code == 404, response.text


@pytest.mark.parametrize("limit", [1, 9, 10, 99, 100, 305, 2**31 - 1])
def test_the_version_pattern_matches_exactly_the_numbers_from_1_to_its_limit(limit):
    numbers = {*range(0, 1100), limit - 1, limit, limit + 1, 2 * limit, 10 * limit}
    pattern = re.compile(decimal_pattern(limit))
    assert {n for n in numbers if pattern.fullmatch(str(n))} == {n for n in numbers if 1 <= n <= limit}
    assert pattern.fullmatch("0" + str(limit)) is None


@pytest.mark.parametrize(
    ("spec", "valid"),
    [
        ({"kind": "finetune", "finetune_blocks": 2}, True),
        ({"kind": "auto", "auto_finetune": True, "finetune_blocks": 2}, True),
        ({"kind": "auto", "finetune_blocks": 2}, False),  # auto tries finetune only with auto_finetune
        ({"kind": "auto", "auto_finetune": False, "finetune_blocks": 2}, False),
        ({"kind": "finetune", "finetune_blocks": MAX_FINETUNE_BLOCKS + 1}, False),
        ({"kind": "linear", "search": {"lr": [0.1], "weight_decay": [0.0]}, "hyperparams": {"epochs": 5}}, True),
        ({"kind": "prototype", "hyperparams": {"epochs": 5}}, False),
        ({"kind": "auto", "search": {"lr": [0.1], "weight_decay": [0.0]}}, False),
        ({"kind": "auto", "search": None, "hyperparams": None}, True),
        ({"kind": "linear", "objective": "balanced_accuracy", "class_weighting": "none", "scaling": "l2"}, True),
        ({"scaling": "standardise"}, True),  # an unset kind is linear
        ({"kind": None, "class_weighting": "balanced"}, True),
        ({"kind": "mlp", "scaling": "none", "class_weighting": "balanced"}, True),
        ({"kind": "finetune", "class_weighting": "balanced"}, True),
        ({"kind": "auto", "scaling": "standardise", "class_weighting": "none"}, True),
        ({"kind": "prototype", "objective": "balanced_accuracy"}, True),
        ({"kind": "prototype", "scaling": "l2"}, False),
        ({"kind": "finetune", "scaling": "standardise"}, False),
        ({"kind": "prototype", "class_weighting": "balanced"}, False),
        ({"objective": "f1"}, False),
        ({"class_weighting": "inverse"}, False),
        ({"scaling": "L2"}, False),
    ],
)
async def test_a_training_spec_is_refused_by_its_schema_exactly_when_the_server_refuses_it(client, key, spec, valid):
    spec = {"dataset": "datasets/ds_none", "head": "h", **spec}
    components = create_app(Settings(), lambda: None).openapi()["components"]
    schema = {"$ref": "#/components/schemas/TrainingSpec", "components": components}
    assert jsonschema_rs.Draft202012Validator(schema).is_valid(spec) == valid
    response = await client.post("/v1/jobs", json=spec, headers=bearer(key))
    assert (response.status_code != 422) == valid, response.text  # valid: on to the dataset (404)


@pytest.fixture
def dataset(runtime, key) -> str:
    """A dataset of acme's, on which jobs can be created (and are never run: the runtime is not started); the
    trainer's cost check reads the dataset only, as no backbone is loaded."""
    datasets = runtime.core.datasets

    def cost(tenant, request):
        images = datasets.get(tenant, request.dataset_id).num_examples
        memory = FeatureMemory(backbone="mobilenet_v2", split="pooled", elements=1280, bytes=images * 1280 * 12)
        return TrainingCost(epochs=request.epochs, images=images, trials=request.trials, memory=memory)

    runtime.core.trainer.cost = cost  # type: ignore[method-assign]
    created = datasets.create_from_labelled("acme", "ds", [("r.png", PNG_RED), ("b.png", PNG_BLUE)], ["r", "b"])
    return f"datasets/{created.id}"


RECIPE = {"objective": "balanced_accuracy", "class_weighting": "balanced", "scaling": "l2"}


@pytest.mark.parametrize("kind", ["linear", "auto"])
async def test_the_recipe_options_reach_the_jobs_spec_and_its_stored_request(runtime, client, key, dataset, kind):
    spec = {"dataset": dataset, "head": "h", "backbone": "mobilenet_v2", "kind": kind, **RECIPE}
    created = await client.post("/v1/jobs", json=spec, headers=bearer(key))
    assert created.status_code == 202, created.text
    read = await client.get(f"/v1/{created.json()['name']}", headers=bearer(key))
    for job in (created.json(), read.json()):
        assert {field: job["spec"][field] for field in RECIPE} == RECIPE
    request = runtime.jobs.get("acme", created.json()["name"].removeprefix("jobs/")).request
    assert {field: getattr(request, field).value for field in RECIPE} == RECIPE


async def test_a_spec_without_recipe_options_shows_the_default_objective_and_leaves_the_rest_to_graft(
    client, key, dataset
):
    spec = {"dataset": dataset, "head": "h", "backbone": "mobilenet_v2", "kind": "prototype"}
    created = await client.post("/v1/jobs", json=spec, headers=bearer(key))
    assert created.status_code == 202, created.text
    job_spec = created.json()["spec"]
    assert job_spec["objective"] == "accuracy"
    assert job_spec.get("class_weighting") is None and job_spec.get("scaling") is None


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"kind": "prototype", "scaling": "l2"}, None, "scaling applies to kind"),
        ({"kind": "finetune", "scaling": "none"}, None, "scaling applies to kind"),
        ({"kind": "prototype", "class_weighting": "none"}, None, "class_weighting applies to kind"),
        ({"objective": "f1"}, "objective", "'accuracy' or 'balanced_accuracy'"),
        ({"class_weighting": "inverse"}, "class_weighting", "'none' or 'balanced'"),
        ({"scaling": "pca"}, "scaling", "'none', 'standardise' or 'l2'"),
    ],
)
async def test_a_bad_recipe_option_is_refused_with_a_message_that_names_it_and_no_job_is_made(
    runtime, client, key, dataset, options, field, message
):
    spec = {"dataset": dataset, "head": "h", "backbone": "mobilenet_v2", **options}
    response = await client.post("/v1/jobs", json=spec, headers=bearer(key))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "invalid_argument" and message in body["message"], body
    if field is not None:
        assert any(field in problem["field"] for problem in body["details"]["problems"]), body
    assert runtime.jobs.list("acme", 10, None)[0] == []


def test_no_form_field_is_documented_as_null_which_a_form_cannot_send():
    openapi = create_app(Settings(), lambda: None).openapi()
    for path, operations in openapi["paths"].items():
        for operation in operations.values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if form is None:
                continue
            body = openapi["components"]["schemas"][form["schema"]["$ref"].rsplit("/", 1)[1]]
            for name, field in body["properties"].items():
                assert '"type": "null"' not in json.dumps(field), f"{path} {name}: {field}"


@pytest.mark.parametrize(
    "request_id", ["a", "a b", "~" * 255, "550e8400-e29b-41d4-a716-446655440000", "é", "a\x7f", "a\tb", "x" * 256]
)
def test_the_idempotency_key_schema_admits_exactly_the_keys_the_store_accepts(request_id):
    try:
        accepted = check_key(request_id) == request_id
    except InvalidArgument:
        accepted = False
    assert (re.fullmatch(IDEMPOTENCY_KEY_PATTERN, request_id) is not None) == accepted


# Over-long or not base64url: the schema's pattern refuses it (422); base64url of nested JSON: the store does (400).
@pytest.mark.parametrize(("token", "status"), [("W" * 5000, 422), ("é", 422), ("W1tbW1tbW1tbW1tbXV1dXV1dXV1dXV0", 400)])
async def test_a_malformed_page_token_is_a_client_error(client, key, token, status):
    response = await client.get("/v1/heads", params={"page_token": token}, headers=bearer(key))
    assert response.status_code == status and "page_token" in response.json()["message"]


# -- error bodies -----------------------------------------------------------------------------------------


async def test_an_unexpected_error_is_a_500_with_a_reference_and_no_details(runtime, client, key, caplog):
    secret_text = "s3cret connection string"

    def broken(_conn, _cursor, statement, *_):
        if "datasets" in statement:
            raise RuntimeError(secret_text)

    event.listen(runtime.core.db.engine, "before_cursor_execute", broken)
    try:
        response = await client.get("/v1/datasets", headers=bearer(key))
    finally:
        event.remove(runtime.core.db.engine, "before_cursor_execute", broken)
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal" and body["message"].startswith("internal error (reference ")
    assert secret_text not in response.text
    assert any(body["details"]["reference"] in record.getMessage() for record in caplog.records)


async def test_a_quota_refusal_is_429_naming_its_setting(client, key):
    files = [("files", ("a.png", PNG_RED, "image/png")), ("files", ("b.png", PNG_BLUE, "image/png"))]
    first = await client.post(
        "/v1/datasets", data={"display_name": "one", "labels": ["red", "blue"]}, files=files, headers=bearer(key)
    )
    assert first.status_code == 201, first.text
    second = await client.post(
        "/v1/datasets", data={"display_name": "two", "labels": ["red", "blue"]}, files=files, headers=bearer(key)
    )
    assert second.status_code == 429 and "GRAFT_QUOTA_DATASETS" in second.json()["message"]


async def test_a_multipart_upload_may_have_as_many_files_as_the_dataset_limit_allows(runtime, client, key):
    """Starlette alone refuses more than 1,000 files; the dataset limit here is 1,500."""
    runtime.settings.max_upload_bytes = 10_000_000  # the gate reads it per request
    files = [("files", (f"{i}.png", PNG_RED if i % 2 else PNG_BLUE, "image/png")) for i in range(1200)]
    labels = ["red" if i % 2 else "blue" for i in range(1200)]
    response = await client.post(
        "/v1/datasets", data={"display_name": "many", "labels": labels}, files=files, headers=bearer(key)
    )
    assert response.status_code == 201, response.text
    assert response.json()["example_count"] == 1200


def test_errors_map_to_statuses_and_retry_after_is_whole_seconds_rounded_up():
    limited = error_response(ResourceExhausted("slow down", retry_after_s=1.2))
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "2"
    assert "Retry-After" not in error_response(ResourceExhausted("full")).headers
    assert error_response(PayloadTooLarge("big")).status_code == 413
    assert error_response(Unavailable("draining")).status_code == 503
    assert error_response(DeadlineExceeded("late")).status_code == 504


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


PNG_RED, PNG_BLUE = _png((200, 0, 0)), _png((0, 0, 200))


# -- HTTP upload bodies share the in-flight upload budget with gRPC streams ------------------


class PausedBody:
    """A chunked upload body that sends ``first`` bytes, then waits for ``go`` before it ends."""

    def __init__(self, first: int) -> None:
        self.first, self.go, self.sent = first, asyncio.Event(), asyncio.Event()

    async def __aiter__(self):
        yield ENDLESS_ZIP_PART + b"x" * (self.first - len(ENDLESS_ZIP_PART))
        self.sent.set()
        await self.go.wait()
        yield b"\r\n--b--\r\n"


async def test_http_uploads_hold_the_in_flight_upload_budget_and_one_that_does_not_fit_is_429_unread(
    runtime, client, key
):
    """With 3,000 bytes for all uploads: a chunked upload in progress holds its 2,500 bytes, so a second
    upload declaring 2,000 is refused before a byte is read, and a chunked one as it crosses the budget;
    once the first is answered, everything is given back."""
    runtime.uploads.limit = 3000  # GRAFT_MAX_INFLIGHT_UPLOAD_BYTES, shared with gRPC CreateDataset streams
    headers = {**bearer(key), "Content-Type": "multipart/form-data; boundary=b"}
    paused = PausedBody(2500)
    first = asyncio.ensure_future(client.post("/v1/datasets", content=paused, headers=headers))
    await asyncio.wait_for(paused.sent.wait(), 5)
    try:
        declared = await client.post("/v1/datasets", content=b"y" * 2000, headers=headers)
        assert declared.status_code == 429, declared.text
        assert (
            "GRAFT_MAX_INFLIGHT_UPLOAD_BYTES" in declared.json()["message"] and declared.headers["Retry-After"] == "5"
        )
        chunked = Body(2000, start=ENDLESS_ZIP_PART)
        response = await client.post("/v1/datasets", content=chunked, headers=headers)
        assert response.status_code == 429, response.text
        assert (
            "GRAFT_MAX_INFLIGHT_UPLOAD_BYTES" in response.json()["message"] and response.headers["Retry-After"] == "5"
        )
        assert chunked.pulled < chunked.total
    finally:
        paused.go.set()
        await first
    assert runtime.uploads.held == 0
