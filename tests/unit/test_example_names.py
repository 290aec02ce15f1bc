"""Examples keep the names their upload gave them (issue 26): file names and client ids, through every upload door,
in the examples list and in the audit's findings."""

import asyncio
from pathlib import Path

import grpc
import httpx
import pytest

from client import cli
from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from harness.inprocess import serve_http
from harness.sample_data import fashion_mnist_pngs
from service.auditing import AuditRequest
from service.config import Settings
from service.errors import InvalidArgument, NotFound
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.quotas import Quotas
from service.resources import DatasetAudit
from service.runtime import Runtime
from service.store.blobs import BlobStore
from service.store.datasets import DatasetStore
from service.store.db import Database
from tests.unit.test_datasets import image_bytes, make_zip

TENANT = "acme"
CLASSES = ("trouser", "bag", "sneaker")
FLIPS = {"trouser": "bag", "bag": "sneaker", "sneaker": "trouser"}  # the first image of each class, misfiled


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    settings = Settings(data_dir=tmp_path, max_image_bytes=20_000, max_images_per_dataset=10)
    db = Database(settings.resolved_registry_url)
    return DatasetStore(db, BlobStore(settings.blob_dir), settings, Quotas(settings))


def files(count: int) -> list[tuple[str, bytes]]:
    return [(f"shots/img_{i}.png", image_bytes(seed=i)) for i in range(count)]


def labels(count: int) -> list[str]:
    return ["cat" if i % 2 == 0 else "dog" for i in range(count)]


# -- the store ---------------------------------------------------------------------------------------------------------


def test_multipart_files_keep_their_names_and_client_ids(store):
    dataset = store.create_from_labelled(TENANT, "pets", files(3), labels(3), ["a-1", "", "c.3"])
    examples, token = store.list_examples(TENANT, dataset.id)
    assert token is None
    assert [(e.index, e.file_name, e.client_id, e.label) for e in examples] == [
        (0, "shots/img_0.png", "a-1", "cat"),
        (1, "shots/img_1.png", None, "dog"),
        (2, "shots/img_2.png", "c.3", "cat"),
    ]
    assert store.get_example(TENANT, dataset.id, "c.3") == examples[2]
    assert store.get_example(TENANT, dataset.id, "1") == examples[1]


def test_zip_members_keep_their_paths_inside_the_archive(store):
    archive = make_zip({"photos/cat/a.png": image_bytes(seed=1), "photos/dog/b.png": image_bytes(seed=2)})
    dataset = store.create_from_zip(TENANT, "zipped", archive)
    examples, _ = store.list_examples(TENANT, dataset.id)
    assert [(e.file_name, e.label) for e in examples] == [("photos/cat/a.png", "cat"), ("photos/dog/b.png", "dog")]


def test_folder_files_keep_their_paths_below_the_folder(store, tmp_path):
    for label, seed in [("cat", 1), ("dog", 2)]:
        (tmp_path / "upload" / label).mkdir(parents=True)
        (tmp_path / "upload" / label / f"{seed}.png").write_bytes(image_bytes(seed=seed))
    dataset = store.create_from_folder(TENANT, "folder", tmp_path / "upload")
    examples, _ = store.list_examples(TENANT, dataset.id)
    assert [e.file_name for e in examples] == ["cat/1.png", "dog/2.png"]


@pytest.mark.parametrize(
    ("client_ids", "message"),
    [
        (["x", "y", "x"], "client id 'x' of file 'shots/img_2.png' is given to an earlier file"),
        (["x", "a/b", "z"], "client id 'a/b' of file 'shots/img_1.png' is not 1 to 128"),
        (["x", "y", "42"], "not all digits"),
        (["x", "y", "z" * 129], "is not 1 to 128"),
        (["x", "..", "z"], "nor '.' or '..'"),
        (["x", "y"], "2 client ids for 3 files"),
    ],
)
def test_bad_or_duplicate_client_ids_are_refused_and_nothing_is_stored(store, client_ids, message):
    with pytest.raises(InvalidArgument, match=message):
        store.create_from_labelled(TENANT, "pets", files(3), labels(3), client_ids)
    assert store.list(TENANT) == ([], None)


@pytest.mark.parametrize(
    ("file_name", "message"), [("x" * 1025, "file name is 1025 characters"), ("a\nb.png", "control characters")]
)
def test_file_names_too_long_or_with_control_characters_are_refused(store, file_name, message):
    with pytest.raises(InvalidArgument, match=message):
        store.create_from_labelled(TENANT, "pets", [(file_name, image_bytes()), *files(1)], labels(2))
    assert store.list(TENANT) == ([], None)


def test_the_same_client_id_may_name_examples_of_two_datasets(store):
    first = store.create_from_labelled(TENANT, "one", files(2), labels(2), ["x", "y"])
    second = store.create_from_labelled(TENANT, "two", files(2), labels(2), ["x", "y"])
    assert store.get_example(TENANT, first.id, "x").index == store.get_example(TENANT, second.id, "x").index == 0


def test_the_examples_list_pages_in_upload_order(store):
    dataset = store.create_from_labelled(TENANT, "pets", files(5), labels(5))
    seen, token, pages = [], None, 0
    while True:
        page, token = store.list_examples(TENANT, dataset.id, page_size=2, page_token=token)
        seen += [e.index for e in page]
        pages += 1
        if token is None:
            break
    assert (seen, pages) == ([0, 1, 2, 3, 4], 3)
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list_examples(TENANT, dataset.id, page_token="bm90LWEtdG9rZW4")


def test_another_tenants_dataset_and_unknown_examples_are_not_found(store):
    dataset = store.create_from_labelled(TENANT, "pets", files(2), labels(2), ["x", "y"])
    with pytest.raises(NotFound):
        store.list_examples("globex", dataset.id)
    with pytest.raises(NotFound):
        store.get_example("globex", dataset.id, "x")
    for unknown in ("z", "2", "12345678901"):
        with pytest.raises(NotFound, match=f"no example '{unknown}'"):
            store.get_example(TENANT, dataset.id, unknown)


# -- both doors -----------------------------------------------------------------------------------------------------


@pytest.fixture
def runtime(make_core, tmp_path) -> Runtime:
    runtime = Runtime.around(make_core(tmp_path))
    for tenant in (TENANT, "globex"):
        runtime.tenants.create_tenant(tenant)
    return runtime


@pytest.fixture
def keys(runtime) -> dict[str, str]:
    return {tenant: runtime.tenants.create_key(tenant).secret for tenant in (TENANT, "globex")}


@pytest.mark.anyio
async def test_http_uploads_keep_names_and_client_ids_and_list_and_get_examples(runtime, keys):
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:

        def auth(tenant: str = TENANT) -> dict[str, str]:
            return {"Authorization": f"Bearer {keys[tenant]}"}

        async def upload(client_ids: list[str]) -> httpx.Response:
            form = {"display_name": "pets", "labels": labels(3), "client_ids": client_ids}
            multipart = [("files", (name, data, "image/png")) for name, data in files(3)]
            return await client.post("/v1/datasets", data=form, files=multipart, headers=auth())

        created = await upload(["a", "b", "c"])
        duplicate = await upload(["a", "b", "a"])
        assert created.status_code == 201, created.text
        dataset = created.json()["name"]
        first = await client.get(f"/v1/{dataset}/examples", params={"page_size": 2}, headers=auth())
        rest = await client.get(
            f"/v1/{dataset}/examples", params={"page_token": first.json()["next_page_token"]}, headers=auth()
        )
        by_id = await client.get(f"/v1/{dataset}/examples/b", headers=auth())
        by_position = await client.get(f"/v1/{dataset}/examples/2", headers=auth())
        theirs = await client.get(f"/v1/{dataset}/examples", headers=auth("globex"))
        unknown = await client.get(f"/v1/{dataset}/examples/zz", headers=auth())
        archive = await client.post(
            "/v1/datasets",
            data={"display_name": "zip", "client_ids": ["a"]},
            files=[("archive", ("a.zip", make_zip({"cat/a.png": image_bytes()}), "application/zip"))],
            headers=auth(),
        )
    assert duplicate.status_code == 400 and "client id 'a'" in duplicate.json()["message"]
    assert [e["client_id"] for e in first.json()["examples"]] == ["a", "b"]
    assert [e["file_name"] for e in rest.json()["examples"]] == ["shots/img_2.png"]
    assert rest.json()["next_page_token"] == ""
    assert by_id.json() == {
        "name": f"{dataset}/examples/1",
        "index": 1,
        "file_name": "shots/img_1.png",
        "client_id": "b",
        "label": "dog",
        "image_sha256": first.json()["examples"][1]["image_sha256"],
    }
    assert by_position.json()["client_id"] == "c"
    assert theirs.status_code == 404 and unknown.status_code == 404
    assert archive.status_code == 400 and "not both" in archive.json()["message"]


@pytest.mark.anyio
async def test_grpc_uploads_keep_names_and_client_ids_and_list_and_get_examples(runtime, keys):
    def stream(client_ids: list[str]) -> list[api.CreateDatasetRequest]:
        header = api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name="pets"))
        images = [
            api.CreateDatasetRequest(
                image=api.CreateDatasetRequest.Image(file_name=name, label=label, data=data, client_id=client_id)
            )
            for (name, data), label, client_id in zip(files(3), labels(3), client_ids, strict=True)
        ]
        return [header, *images]

    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rpc.DatasetServiceStub(channel)
            mine = [("authorization", f"Bearer {keys[TENANT]}")]
            dataset = await stub.CreateDataset(iter(stream(["a", "", "c"])), metadata=mine)
            with pytest.raises(grpc.aio.AioRpcError) as duplicate:
                await stub.CreateDataset(iter(stream(["a", "a", "c"])), metadata=mine)
            first = await stub.ListExamples(api.ListExamplesRequest(parent=dataset.name, page_size=2), metadata=mine)
            rest = await stub.ListExamples(
                api.ListExamplesRequest(parent=dataset.name, page_token=first.next_page_token), metadata=mine
            )
            by_id = await stub.GetExample(api.GetExampleRequest(name=f"{dataset.name}/examples/c"), metadata=mine)
            refused = {}
            for case, tenant, request in [
                ("theirs", "globex", api.GetExampleRequest(name=f"{dataset.name}/examples/a")),
                ("unknown", TENANT, api.GetExampleRequest(name=f"{dataset.name}/examples/zz")),
                ("malformed", TENANT, api.GetExampleRequest(name=dataset.name)),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.GetExample(request, metadata=[("authorization", f"Bearer {keys[tenant]}")])
                refused[case] = error.value.code()
    finally:
        await server.stop(grace=1)
    assert duplicate.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [(e.index, e.file_name, e.client_id) for e in [*first.examples, *rest.examples]] == [
        (0, "shots/img_0.png", "a"),
        (1, "shots/img_1.png", ""),
        (2, "shots/img_2.png", "c"),
    ]
    assert rest.next_page_token == ""
    assert (by_id.name, by_id.index, by_id.label) == (f"{dataset.name}/examples/2", 2, "cat")
    assert refused == {
        "theirs": grpc.StatusCode.NOT_FOUND,
        "unknown": grpc.StatusCode.NOT_FOUND,
        "malformed": grpc.StatusCode.INVALID_ARGUMENT,
    }


# -- the audit names its findings ------------------------------------------------------------------------------------


@pytest.fixture
def class_folders(tmp_path) -> tuple[Path, set[str]]:
    """Eight real images per class in class folders, the first of each class in the wrong folder; its paths."""
    root, misfiled, seen = tmp_path / "garments", set(), set()
    for i, (data, label) in enumerate(fashion_mnist_pngs("train", per_class=8, seed=5)):
        if label not in CLASSES:
            continue
        folder = label
        if label not in seen:
            seen.add(label)
            folder = FLIPS[label]
            misfiled.add(f"{folder}/{label}_{i}.png")
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"{label}_{i}.png").write_bytes(data)
    return root, misfiled


def test_audit_suspects_name_the_files_of_a_class_folder_upload(runtime, class_folders):
    root, misfiled = class_folders
    dataset = runtime.core.datasets.create_from_folder(TENANT, "garments", root)
    audit = DatasetAudit.of(runtime.core.auditor.audit(TENANT, AuditRequest(dataset_id=dataset.id)))
    top = audit.suspects[: len(misfiled)]
    assert {s.example.file_name for s in top} == misfiled
    for suspect in top:
        assert suspect.example.file_name.split("/")[1].startswith(suspect.suggested_label)


@pytest.mark.anyio
async def test_graft_audit_prints_the_file_names_first_and_graft_examples_lists_them(
    runtime, keys, class_folders, monkeypatch, capsys
):
    root, misfiled = class_folders
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setenv("GRAFT_API_KEY", keys[TENANT])
    with serve_http(runtime) as port:
        url = f"http://127.0.0.1:{port}"
        assert await asyncio.to_thread(cli.main, ["--url", url, "upload", str(root), "--name", "garments"]) == 0
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["--url", url, "audit", "garments"]) == 0
        audit = capsys.readouterr().out.splitlines()
        assert await asyncio.to_thread(cli.main, ["--url", url, "examples", "garments"]) == 0
    header = next(i for i, row in enumerate(audit) if row.startswith("file"))
    named = {row.split()[0] for row in audit[header + 1 : header + 1 + len(misfiled)]}
    assert named == misfiled
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["file", "client", "id", "position", "label", "sha256"]
    assert sorted(row.split()[0] for row in listed[1:]) == sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.png")
    )


@pytest.mark.anyio
@pytest.mark.parametrize("door", ["http", "grpc"])
async def test_both_clients_list_examples_with_their_names(runtime, keys, door):
    dataset = runtime.core.datasets.create_from_labelled(TENANT, "pets", files(3), labels(3), ["a", "", "c"])
    if door == "http":
        with serve_http(runtime) as port, HttpClient(f"http://127.0.0.1:{port}", keys[TENANT]) as client:
            found = await asyncio.to_thread(client.list_examples, dataset.id)
    else:
        server = await start_grpc_server(runtime, 0, host="127.0.0.1")
        try:
            with GrpcClient(f"127.0.0.1:{server.port}", keys[TENANT]) as client:
                found = await asyncio.to_thread(client.list_examples, dataset.id)
        finally:
            await server.stop(grace=1)
    assert [(e.display, e.client_id, e.label) for e in found] == [
        ("shots/img_0.png", "a", "cat"),
        ("shots/img_1.png", None, "dog"),
        ("shots/img_2.png", "c", "cat"),
    ]
