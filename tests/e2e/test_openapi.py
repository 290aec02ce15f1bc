"""The OpenAPI document tells the truth about a running service, and /docs works without internet.

schemathesis generates valid and invalid requests for every operation and runs
every check (statuses and bodies as documented, constraints enforced, unknown
methods refused in the error body). Bounded: GRAFT_FUZZ_EXAMPLES per operation
(`make fuzz` raises it).

The fuzzed tenant owns real resources, made before the run: a dataset of
Fashion-MNIST PNGs, a head trained on it (with aliases) and its finished job,
and for each destructive operation a resource of its own, so that deleting or
cancelling never takes away what another operation reads. schemathesis draws
their names for part of the cases (its dictionaries) and generates the rest, so
every operation is fuzzed past its 404 and unknown or malformed names are
still tried; an operation that still answers nothing but 4xx with 404 among
them fails the run (its `missing_test_data` warning). The server is a serving
replica (GRAFT_ROLE=serve) started on the data a first one trained: jobs the
fuzzer creates stay queued rather than train on the test's cores, and one of
them is there to be cancelled.
"""

import base64
import dataclasses
import io
import json
import os
import re
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from harness.sample_data import fashion_mnist_pngs
from harness.servers import Server, make_tenant_key, start_server, wait_for_job

FUZZ_EXAMPLES = int(os.environ.get("GRAFT_FUZZ_EXAMPLES", "8"))
WEBHOOK_NETWORK = "127.0.0.1/32"  # the fuzzed replica's only allowance: webhooks to a port nothing listens on
WEBHOOK_URL = "http://127.0.0.1:9/hook"
CLASSES = ("trouser", "sneaker", "bag")


@dataclasses.dataclass(frozen=True)
class Resources:
    """The fuzzed tenant's real resources, by the values the operations take."""

    dataset: str  # an id: read, audited and trained on
    doomed_dataset: str  # an id, for DELETE /v1/datasets/{dataset} alone
    head: str  # trained once, with aliases 'prod' and 'spare' on its version 1
    doomed_head: str  # for DELETE /v1/heads/{head} alone
    pruned_head: str  # its version 1 is for DELETE /v1/heads/{head}/versions/{version} alone
    job: str  # an id: the head's finished training job
    queued_job: str  # an id: a job no replica runs, for POST /v1/jobs/{job}:cancel alone
    batch_prediction: str  # an id: a succeeded batch prediction, read and its results downloaded
    doomed_batch_prediction: str  # an id: a succeeded one, for DELETE /v1/batchPredictions/{id} alone
    queued_batch_prediction: str  # an id: one no replica runs, for POST /v1/batchPredictions/{id}:cancel alone
    image: str  # a base64 PNG, for JSON predictions
    image_file: str  # a BMP as text, for multipart uploads (see ascii_bmp)
    webhook: str  # an id: a webhook to a closed loopback port, allowed (GRAFT_WEBHOOK_ALLOWED_NETWORKS)
    doomed_webhook: str  # an id, for DELETE /v1/webhooks/{webhook} alone


def ascii_bmp(png: bytes) -> str:
    """The image as a BMP whose every byte is ASCII below DEL, as text.

    schemathesis's dictionary values are text, sent as UTF-8: only ASCII bytes arrive as they were, and a
    TOML string cannot hold DEL. A BMP's header is small integers, and halved pixel values are below 128.
    """
    dimmed = Image.eval(Image.open(io.BytesIO(png)).convert("RGB"), lambda value: min(value // 2, 126))
    buffer = io.BytesIO()
    dimmed.save(buffer, format="BMP", dpi=(1, 1))  # 39 pixels per metre: one byte below 128
    data = buffer.getvalue()
    assert max(data) < 0x7F
    return data.decode("ascii")


def client(server: Server, key: str) -> httpx.Client:
    """The fuzzed tenant's client of ``server``."""
    return httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def upload(api: httpx.Client, examples: list[tuple[bytes, str]], display_name: str) -> str:
    """A dataset of ``examples``; returns its id."""
    files = [("files", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(examples)]
    labels = [label for _, label in examples]
    response = api.post("/v1/datasets", data={"display_name": display_name, "labels": labels}, files=files)
    assert response.status_code == 201, response.text
    return response.json()["name"].removeprefix("datasets/")


def predict_in_batch(api: httpx.Client, dataset: str, head: str) -> str:
    """A batch prediction of ``head`` over ``dataset`` run to completion; returns its id."""
    response = api.post("/v1/batchPredictions", json={"dataset": f"datasets/{dataset}", "heads": [head]})
    assert response.status_code == 202, response.text
    batch = wait_for_job(api, response.json()["name"], timeout_s=300)
    assert batch["state"] == "succeeded", batch
    return batch["name"].removeprefix("batchPredictions/")


def train(api: httpx.Client, dataset: str, head: str) -> str:
    """A new version of ``head`` trained to completion; returns its job's id."""
    response = api.post("/v1/jobs", json={"dataset": f"datasets/{dataset}", "head": head})
    assert response.status_code == 202, response.text
    job = wait_for_job(api, response.json()["name"], timeout_s=300)
    assert job["state"] == "succeeded", job
    return job["name"].removeprefix("jobs/")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[Server, str, Resources]]:
    """A serving replica on the data a first replica trained, with the fuzzed tenant's key and resources."""
    data_dir = tmp_path_factory.mktemp("openapi")
    examples = [example for example in fashion_mnist_pngs("test", per_class=6, seed=3) if example[1] in CLASSES]
    trainer = start_server(data_dir)
    try:
        key = make_tenant_key(trainer, "fuzz")
        with client(trainer, key) as api:
            dataset = upload(api, examples, "fuzzed")
            doomed_dataset = upload(api, [next(e for e in examples if e[1] == c) for c in CLASSES], "doomed")
            job = train(api, dataset, "fuzzed")
            train(api, dataset, "doomed")
            train(api, dataset, "pruned")
            for alias in ("prod", "spare"):
                assert api.put(f"/v1/heads/fuzzed/aliases/{alias}", json={"version": 1}).status_code == 200
            batch_prediction = predict_in_batch(api, doomed_dataset, "fuzzed")
            doomed_batch_prediction = predict_in_batch(api, doomed_dataset, "fuzzed")
    finally:
        trainer.stop()
    # The batch predictions the fuzzer creates stay queued (a serving replica runs none): room for all of them.
    server = start_server(
        data_dir,
        GRAFT_ROLE="serve",
        GRAFT_WEBHOOK_ALLOWED_NETWORKS=WEBHOOK_NETWORK,
        GRAFT_QUOTA_BATCH_PREDICTIONS="1000",
    )
    try:
        with client(server, key) as api:
            queued = api.post("/v1/jobs", json={"dataset": f"datasets/{dataset}", "head": "queued"})
            assert queued.status_code == 202, queued.text
            webhook, doomed_webhook = (
                api.post("/v1/webhooks", json={"url": WEBHOOK_URL, "event_types": ["job.failed"]}) for _ in range(2)
            )
            assert webhook.status_code == doomed_webhook.status_code == 201, webhook.text
            queued_batch = api.post(
                "/v1/batchPredictions", json={"dataset": f"datasets/{dataset}", "heads": ["fuzzed"]}
            )
            assert queued_batch.status_code == 202, queued_batch.text
        yield (
            server,
            key,
            Resources(
                dataset=dataset,
                doomed_dataset=doomed_dataset,
                head="fuzzed",
                doomed_head="doomed",
                pruned_head="pruned",
                job=job,
                queued_job=queued.json()["name"].removeprefix("jobs/"),
                batch_prediction=batch_prediction,
                doomed_batch_prediction=doomed_batch_prediction,
                queued_batch_prediction=queued_batch.json()["name"].removeprefix("batchPredictions/"),
                image=base64.b64encode(examples[0][0]).decode(),
                image_file=ascii_bmp(examples[1][0]),
                webhook=webhook.json()["name"].removeprefix("webhooks/"),
                doomed_webhook=doomed_webhook.json()["name"].removeprefix("webhooks/"),
            ),
        )
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(served) -> Server:
    return served[0]


@pytest.fixture(scope="module")
def key(served) -> str:
    return served[1]


@pytest.fixture(scope="module")
def resources(served) -> Resources:
    return served[2]


def test_docs_reference_only_assets_the_service_serves_itself(server):
    page = httpx.get(f"{server.http_url}/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and all(asset.startswith("/") for asset in assets), assets  # no CDN
    for asset in assets:
        assert httpx.get(f"{server.http_url}{asset}").status_code == 200, asset


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/v1/nowhere", 404, None),  # no route at all: BentoML's own app answers
        ("POST", "/livez", 405, "GET, HEAD"),  # one of BentoML's routes
        ("OPTIONS", "/v1/heads/weave", 405, "DELETE, GET"),  # every method of the path, not the first route's
        ("DELETE", "/v1/heads/weave:export", 405, "GET"),  # a custom method is not the head 'weave:export'
        ("GET", "/v1/jobs/job_1:cancel", 405, "POST"),
        ("TRACE", "/v1/admin/tenants", 405, "POST"),  # before the admin key is asked for
    ],
)
def test_unknown_routes_and_methods_answer_in_the_error_body(server, key, method, path, status, allow):
    response = httpx.request(method, f"{server.http_url}{path}", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"code", "message", "details"}
    assert response.headers.get("allow") == allow


# What no schema can state, so schemathesis is told it here (each line says why). $names are the fuzzed tenant's
# resources (Resources).
CONFIG = string.Template("""
# Every check (what `--checks all` selects; on the command line it would override the exceptions below).
[checks]
enabled = true

# An operation that answers nothing but 4xx, 404 among them, never got past its lookups.
[warnings]
fail-on = ["missing_test_data"]

# Real resources, by the values the parameters take.
[dictionaries]
dataset = { values = ["$dataset"] }
dataset-name = { values = ["datasets/$dataset"] }
head = { values = ["$head"] }
head-ref = { values = ["$head", "$head@1", "$head:prod", "heads/$head:spare", "imagenet@mobilenet_v2"] }
stored-head-ref = { values = ["$head", "$head@1", "$head:prod"] }  # export takes no 'heads/' nor ImageNet head
alias = { values = ["prod"] }
version = { values = [1] }
job = { values = ["$job"] }
backbone = { values = ["mobilenet_v2"] }
image = { values = ["$image"] }
image-file = { values = ["$image_file"] }
doomed-dataset = { values = ["$doomed_dataset"] }
doomed-head = { values = ["$doomed_head"] }
pruned-head = { values = ["$pruned_head"] }
spare-alias = { values = ["spare"] }
queued-job = { values = ["$queued_job"] }
example = { values = ["0"] }  # the dataset's first example, by position
webhook = { values = ["$webhook"] }
doomed-webhook = { values = ["$doomed_webhook"] }
webhook-url = { values = ["http://127.0.0.1:9/fuzzed"] }
event-type = { values = ["job.succeeded"] }
batch-prediction = { values = ["$batch_prediction"] }
doomed-batch-prediction = { values = ["$doomed_batch_prediction"] }
queued-batch-prediction = { values = ["$queued_batch_prediction"] }

# Half of the fuzzing phase's cases take a real resource, the other half a generated name (404, or 400/422 when
# malformed); the coverage phase draws no dictionary, so it tries its boundary values on every operation.
[parameters]
"path.dataset" = { dictionary = "dataset", probability = 0.5 }
"path.head" = { dictionary = "head", probability = 0.5 }
"path.alias" = { dictionary = "alias", probability = 0.5 }
"path.job" = { dictionary = "job", probability = 0.5 }
"path.batch_prediction" = { dictionary = "batch-prediction", probability = 0.5 }
"path.backbone" = { dictionary = "backbone", probability = 0.5 }
"query.backbone" = { dictionary = "backbone", probability = 0.5 }
"body.dataset" = { dictionary = "dataset-name", probability = 0.5 }
"body.heads[*]" = { dictionary = "head-ref", probability = 0.5 }
"body.images[*]" = { dictionary = "image", probability = 0.5 }
"body.files[*]" = { dictionary = "image-file", probability = 0.5 }
"body.version" = { dictionary = "version", probability = 0.5 }
"path.example" = { dictionary = "example", probability = 0.5 }
"body.updates[*].example" = { dictionary = "example", probability = 0.5 }
"path.webhook" = { dictionary = "webhook", probability = 0.5 }
"body.url" = { dictionary = "webhook-url", probability = 0.5 }
"body.event_types[*]" = { dictionary = "event-type", probability = 0.5 }
# A page token is minted by the service (opaque base64url of a sort key): a generated one is refused with 400,
# rightly. Lists are fuzzed from the first page; tests/e2e/test_http_e2e.py follows real tokens.
"query.page_token" = ""

# Filters are one `include-name` ("METHOD /path"): separate include-path and include-method keys would each
# select operations on their own (every POST, say).

[[operations]]
include-name = "GET /v1/heads/{head}:export"
parameters."path.head" = { dictionary = "stored-head-ref", probability = 0.5 }

# A destructive operation is given a resource of its own, in every fuzzing case (after the first, it is gone:
# 404), and never a name another operation's response showed it: deleting the resources the others read would
# turn their cases into 404s, in whatever order they run.
[[operations]]
include-name = "DELETE /v1/datasets/{dataset}"
parameters."path.dataset" = { dictionary = "doomed-dataset", probability = 1.0 }
phases.coverage.extra-data-sources.responses = false
phases.fuzzing.extra-data-sources.responses = false

[[operations]]
include-name = "DELETE /v1/heads/{head}"
parameters."path.head" = { dictionary = "doomed-head", probability = 1.0 }
phases.coverage.extra-data-sources.responses = false
phases.fuzzing.extra-data-sources.responses = false

[[operations]]
include-name = "DELETE /v1/heads/{head}/versions/{version}"
parameters."path.head" = { dictionary = "pruned-head", probability = 1.0 }
parameters."path.version" = { dictionary = "version", probability = 1.0 }
phases.coverage.extra-data-sources.responses = false
phases.fuzzing.extra-data-sources.responses = false

[[operations]]
include-name = "DELETE /v1/heads/{head}/aliases/{alias}"
parameters."path.head" = { dictionary = "head", probability = 1.0 }
parameters."path.alias" = { dictionary = "spare-alias", probability = 1.0 }
phases.coverage.extra-data-sources.responses = false
phases.fuzzing.extra-data-sources.responses = false

[[operations]]
include-name = "DELETE /v1/webhooks/{webhook}"
parameters."path.webhook" = { dictionary = "doomed-webhook", probability = 1.0 }
phases.coverage.extra-data-sources.responses = false
phases.fuzzing.extra-data-sources.responses = false

[[operations]]
include-name = "DELETE /v1/batchPredictions/{batch_prediction}"
parameters."path.batch_prediction" = { dictionary = "doomed-batch-prediction", probability = 1.0 }
phases.coverage.extra-data-sources.responses = false
phases.fuzzing.extra-data-sources.responses = false

[[operations]]
include-name = "POST /v1/batchPredictions/{batch_prediction}:cancel"
parameters."path.batch_prediction" = { dictionary = "queued-batch-prediction", probability = 1.0 }

# Cancelling is harmless to a finished job (409), so this one may also cancel the jobs the fuzzer queued.
[[operations]]
include-name = "POST /v1/jobs/{job}:cancel"
parameters."path.job" = { dictionary = "queued-job", probability = 1.0 }

# Images must decode (and a dataset needs two classes, one label per file): content, not shape. The fuzzer's
# bytes are refused with 400, rightly, and its real image (above) is accepted; a refusal of the shape (422) of
# valid data still fails the check. Real uploads are in test_http_e2e. Feedback's label must be a class of the
# heads that made the prediction (a real id from a stateful link, with a made-up label: 400, rightly); real
# feedback is in test_shadows_e2e. A webhook's URL must resolve to an allowed address and its event types be known:
# the fuzzer's are refused with 400, rightly, and past GRAFT_MAX_WEBHOOKS_PER_TENANT with 429; real ones are in
# test_webhooks_e2e.
[[operations]]
include-name = [
    "POST /v1/datasets",
    "POST /v1/webhooks",
    "POST /v1/predict",
    "POST /v1/predict:upload",
    "POST /v1/predictions/{prediction_id}:feedback",
]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

# Labels name examples of the dataset, once each, in well-formed CSV rows: content, not shape. The fuzzer's made-up
# rows and repeated examples are refused with 400, rightly; real labelling is in tests/unit/test_pools.py.
[[operations]]
include-name = ["POST /v1/datasets/{dataset}/examples:batchUpdate", "POST /v1/datasets/{dataset}/examples:importLabels"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
""")


def test_schemathesis_finds_no_failure_with_every_check(server, key, resources, tmp_path):
    values = {name: json.dumps(value)[1:-1] for name, value in dataclasses.asdict(resources).items()}  # TOML-escaped
    (tmp_path / "schemathesis.toml").write_text(CONFIG.substitute(values))
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(tmp_path / "schemathesis.toml"),
        "run",
        f"{server.http_url}/openapi.json",
        "--max-examples",
        str(FUZZ_EXAMPLES),
        "--generation-deterministic",
        "--header",
        f"Authorization: Bearer {key}",
        "--request-timeout",
        "60",
        "--workers",
        "1",
        "--no-color",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
