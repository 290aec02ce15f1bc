"""The OpenAPI document tells the truth about a running service, and /docs works without internet.

schemathesis generates valid and invalid requests for every operation and runs
every check (statuses and bodies as documented, constraints enforced, unknown
methods refused in the error body). Bounded: GRAFT_FUZZ_EXAMPLES per operation
(`make fuzz` raises it).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness.servers import make_tenant_key, start_server

FUZZ_EXAMPLES = int(os.environ.get("GRAFT_FUZZ_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("openapi"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(server) -> str:
    return make_tenant_key(server, "fuzz")


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


# What no schema can state, so schemathesis is told it here (each line says why):
CONFIG = """
# Every check (what `--checks all` selects; on the command line it would override the exceptions below).
[checks]
enabled = true

# A page token is minted by the service (opaque base64url of a sort key): a generated one is refused with 400,
# rightly. Lists are fuzzed from the first page; tests/e2e/test_http_e2e.py follows real tokens.
[parameters]
"query.page_token" = ""

# Filters are one `include-name` ("METHOD /path"): separate include-path and include-method keys would each
# select operations on their own (every POST, say).

# Images must decode (and a dataset needs two classes, one label per file): content, not shape. The fuzzer's
# bytes are refused with 400, rightly; a refusal of the shape (422) of valid data still fails the check. Real
# uploads are in test_http_e2e.
[[operations]]
include-name = ["POST /v1/datasets", "POST /v1/predict", "POST /v1/predict:upload"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
"""


def test_schemathesis_finds_no_failure_with_every_check(server, key, tmp_path):
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
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
