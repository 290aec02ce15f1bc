"""Head lookups read what they serve: one reference reads one version's serving columns, a head and lists of heads
read their versions' metrics summaries, and only GetHeadVersion reads one version's whole metrics.

A version's metrics can be megabytes (a 1,000-class confusion matrix); a head may have hundreds of versions.
Checked by the SQL each lookup sends, on SQLite and a real PostgreSQL, and by the size of each door's answer.
"""

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import httpx
import pytest
import torch
from google.protobuf import json_format
from sqlalchemy import event

from adapters.metrics import evaluate
from client import cli
from client.errors import NotFound
from harness.inprocess import client_of
from service.config import Settings
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.quotas import Quotas
from service.runtime import Runtime
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.heads import HeadRegistry

TENANT = "acme"
VERSIONS = 12
CONFUSION = [[7] * 200 for _ in range(200)]  # a 200-class confusion matrix: about 80 KB of JSON per version
# The full metrics column, not metrics_summary (quoted or not, with or without the table's name).
FULL_METRICS = re.compile(r'(^|[\s,."])metrics("?)(\s|,|$)', re.IGNORECASE)


def add_versions(registry: HeadRegistry, tenant: str, name: str, count: int) -> None:
    """``count`` versions of ``name``, each with a large confusion matrix; version v has accuracy v / 100."""
    for version in range(1, count + 1):
        registry.create_version(
            tenant,
            name,
            tensors={"weight": torch.zeros(2, 4)},
            backbone="mobilenet_v2",
            split_point=None,
            kind="linear",
            classes=["a", "b"],
            config={"v": version},
            hyperparams={"lr": 0.1},
            metrics={"accuracy": version / 100, "confusion_matrix": CONFUSION},
            dataset_id="ds_1",
        )


@pytest.fixture
def registry(registry_url: str, tmp_path: Path) -> HeadRegistry:
    registry = HeadRegistry(Database(registry_url), BlobStore(tmp_path / "blobs"), Quotas(Settings(data_dir=tmp_path)))
    add_versions(registry, TENANT, "big", VERSIONS)
    registry.set_alias(TENANT, "big", "prod", 3)
    return registry


@contextlib.contextmanager
def selects(registry: HeadRegistry) -> Iterator[list[str]]:
    """The SELECT statements sent while the block runs."""
    sent: list[str] = []

    def record(_conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append(statement)

    event.listen(registry.db.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(registry.db.engine, "before_cursor_execute", record)


def reads_full_metrics(statement: str) -> bool:
    columns = statement.split(" FROM ")[0]
    return bool(FULL_METRICS.search(columns))


@pytest.mark.parametrize(("ref", "version"), [("big", VERSIONS), ("big@5", 5), ("big:prod", 3), ("big:latest", 12)])
def test_resolving_a_reference_never_reads_any_versions_metrics(registry, ref, version):
    with selects(registry) as sent:
        info = registry.resolve(TENANT, ref)
    assert info.version == version and info.config == {"v": version}
    assert sent and not [s for s in sent if reads_full_metrics(s)], sent


def test_a_list_of_heads_reads_summaries_not_every_versions_full_metrics(registry):
    with selects(registry) as sent:
        heads, _ = registry.list(TENANT)
    assert not [s for s in sent if reads_full_metrics(s)], sent
    (head,) = heads
    assert len(head.versions) == VERSIONS
    assert head.versions[4].metrics == {"accuracy": 0.05}  # the summary: its top-level numbers


def test_a_head_reads_its_versions_summaries_not_their_full_metrics(registry):
    with selects(registry) as sent:
        head = registry.get(TENANT, "big")
    assert sent and not [s for s in sent if reads_full_metrics(s)], sent
    assert [v.metrics for v in head.versions] == [{"accuracy": v / 100} for v in range(1, VERSIONS + 1)]
    assert head.versions[2].aliases == ["prod"] and head.aliases == {"prod": 3, "latest": VERSIONS}


def test_describing_one_version_reads_its_full_metrics_and_aliases(registry):
    version = registry.describe(TENANT, "big@3")
    assert version.metrics == {"accuracy": 0.03, "confusion_matrix": CONFUSION} and version.aliases == ["prod"]
    assert registry.describe(TENANT, "big").aliases == ["latest"]  # as the head's own list of its versions says


# -- over both doors, and the clients ------------------------------------------------------------------------------

OTHER = "other"
DOORS = ["http", "grpc"]
HTTP_ROUTES = {
    "GetHead": ("GET", "/v1/{name}"),
    "GetHeadVersion": ("GET", "/v1/{name}"),
    "SetAlias": ("PUT", "/v1/{name}/aliases/{alias}"),
}
GRPC_REQUESTS = {
    "GetHead": api.GetHeadRequest,
    "GetHeadVersion": api.GetHeadVersionRequest,
    "SetAlias": api.SetAliasRequest,
}


class Answer(NamedTuple):
    code: str  # "ok", or the error's code: the same word over both doors ("not_found", "invalid_argument")
    body: dict[str, Any]  # the resource as JSON, or the error
    size: int  # bytes of the answer (gRPC: the serialized message)


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    """Keys mode, no backbone: acme's head 'big' (prod -> version 3), and another tenant's head 'theirs'."""
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="keys", backbones=[]))
    for tenant in (TENANT, OTHER):
        runtime.tenants.create_tenant(tenant)
    add_versions(runtime.core.heads, TENANT, "big", VERSIONS)
    runtime.core.heads.set_alias(TENANT, "big", "prod", 3)
    add_versions(runtime.core.heads, OTHER, "theirs", 1)
    return runtime


@pytest.fixture
def key(runtime: Runtime) -> str:
    return runtime.tenants.create_key(TENANT).secret


@pytest.fixture
async def ask(runtime: Runtime, key: str) -> AsyncIterator[Callable[..., Awaitable[Answer]]]:
    """``await ask(door, method, name, **fields)``: one HeadService call as acme, over the in-process door."""
    app = create_app(runtime.settings, lambda: runtime)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    auth = {"authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://graft", headers=auth) as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):

        async def over(door: str, method: str, name: str, **fields: Any) -> Answer:
            if door == "http":
                return await over_http(http, method, name, **fields)
            return await over_grpc(rpc.HeadServiceStub(channel), list(auth.items()), method, name, **fields)

        yield over
    await server.stop(grace=1)


async def over_http(http: httpx.AsyncClient, method: str, name: str, alias: str = "", version: int = 0) -> Answer:
    verb, path = HTTP_ROUTES[method]
    target = {"version": version} if version else None
    response = await http.request(verb, path.format(name=name, alias=alias), json=target)
    body = response.json()
    return Answer("ok" if response.is_success else body["code"], body, len(response.content))


async def over_grpc(stub: rpc.HeadServiceStub, metadata: list, method: str, name: str, **fields: Any) -> Answer:
    try:
        reply = await getattr(stub, method)(GRPC_REQUESTS[method](name=name, **fields), metadata=metadata)
    except grpc.aio.AioRpcError as error:
        return Answer(error.code().name.lower(), {"message": error.details()}, 0)
    return Answer("ok", json_format.MessageToDict(reply, preserving_proto_field_name=True), reply.ByteSize())


@pytest.mark.anyio
@pytest.mark.parametrize("door", DOORS)
async def test_get_head_answers_summaries_smaller_than_one_versions_whole_metrics(runtime, ask, door):
    with selects(runtime.core.heads) as sent:
        head = await ask(door, "GetHead", "heads/big")
    assert head.code == "ok" and not [s for s in sent if reads_full_metrics(s)], sent
    assert [v["metrics"] for v in head.body["versions"]] == [{"accuracy": v / 100} for v in range(1, VERSIONS + 1)]
    one = await ask(door, "GetHeadVersion", "heads/big/versions/1")
    assert head.size * 10 < one.size  # all twelve versions' summaries, against one version's whole metrics


@pytest.mark.anyio
@pytest.mark.parametrize("door", DOORS)
async def test_set_alias_answers_the_head_with_its_versions_summaries(runtime, ask, door):
    with selects(runtime.core.heads) as sent:
        head = await ask(door, "SetAlias", "heads/big", alias="canary", version=5)
    assert head.code == "ok" and not [s for s in sent if reads_full_metrics(s)], sent
    assert head.body["aliases"]["canary"] == 5 and head.body["versions"][4]["aliases"] == ["canary"]
    assert [v["metrics"] for v in head.body["versions"]] == [{"accuracy": v / 100} for v in range(1, VERSIONS + 1)]


@pytest.mark.anyio
@pytest.mark.parametrize("door", DOORS)
async def test_get_head_version_answers_its_whole_metrics_and_aliases(ask, door):
    prod = await ask(door, "GetHeadVersion", "heads/big/versions/3")
    assert prod.code == "ok", prod.body
    assert prod.body["name"] == "heads/big/versions/3" and prod.body["aliases"] == ["prod"]
    assert prod.body["metrics"] == {"accuracy": 0.03, "confusion_matrix": CONFUSION}
    latest = await ask(door, "GetHeadVersion", f"heads/big/versions/{VERSIONS}")
    assert latest.body["aliases"] == ["latest"]


@pytest.mark.anyio
@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("name", ["heads/big/versions/99", "heads/nope/versions/1", "heads/theirs/versions/1"])
async def test_get_head_version_of_an_unknown_version_or_head_or_another_tenants_head_is_not_found(ask, door, name):
    answer = await ask(door, "GetHeadVersion", name)
    assert answer.code == "not_found", answer.body
    assert "theirs" not in name or "head 'theirs' not found" in answer.body["message"]  # not even that it exists


@pytest.mark.anyio
@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize(
    "name", ["heads/big/versions/0", "heads/big/versions/2147483648", "heads/big/versions/x", "heads/Big/versions/1"]
)
async def test_a_malformed_head_version_name_is_invalid_argument(ask, door, name):
    answer = await ask(door, "GetHeadVersion", name)
    assert answer.code == "invalid_argument", answer.body


@pytest.mark.anyio
@pytest.mark.parametrize("door", DOORS)
async def test_both_clients_get_one_versions_whole_metrics_and_the_heads_summaries(runtime, key, door):
    async with client_of(runtime, key, door) as client:
        version = await asyncio.to_thread(client.get_head_version, "big", 3)
        head = await asyncio.to_thread(client.get_head, "big")
        with pytest.raises(NotFound, match="head 'big' has no version 99"):
            await asyncio.to_thread(client.get_head_version, "big", 99)
    assert version.display == "big@3" and version.aliases == ["prod"]
    assert version.metrics == {"accuracy": 0.03, "confusion_matrix": CONFUSION}
    assert head.version("prod").metrics == {"accuracy": 0.03}


@pytest.mark.anyio
@pytest.mark.parametrize("door", DOORS)
async def test_graft_report_draws_the_whole_metrics_of_the_version_it_names(
    runtime, key, door, tmp_path, monkeypatch, capsys
):
    evaluated = evaluate(torch.eye(3)[[0, 1, 2, 1]] * 3, torch.tensor([0, 1, 2, 2]), ["cat", "dog", "eel"])
    heads = runtime.core.heads
    heads.create_version(
        TENANT,
        "pets",
        tensors={"weight": torch.zeros(3, 4)},
        backbone="mobilenet_v2",
        split_point=None,
        kind="linear",
        classes=["cat", "dog", "eel"],
        config={},
        hyperparams={},
        dataset_id="ds_1",
        metrics=evaluated.model_dump(mode="json"),
    )
    add_versions(heads, TENANT, "pets", 1)  # a later version: the report draws the one the alias names
    heads.set_alias(TENANT, "pets", "prod", 1)
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setenv("GRAFT_API_KEY", key)
    out = tmp_path / "report.png"
    async with client_of(runtime, key, door) as client:
        code = await asyncio.to_thread(cli.main, ["--url", client.url, "report", "pets:prod", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and capsys.readouterr().out == f"{out}: pets@1\n"
