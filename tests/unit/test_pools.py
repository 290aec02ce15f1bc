"""Unlabelled pools and labelling (issue 26): datasets may hold unlabelled images, labels are set later (one, a batch,
a CSV import) over both doors and the client, and a head version records exactly which labelled examples it used."""

import asyncio
import threading
from pathlib import Path

import grpc
import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from google.protobuf import field_mask_pb2

from client import cli
from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from harness.inprocess import serve_http
from harness.sample_data import fashion_mnist_pngs
from service.auditing import AuditRequest
from service.config import Settings
from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.labelled_set import labelled_set
from service.quotas import Quotas
from service.resources import DatasetAudit
from service.runtime import Runtime
from service.store import migrate
from service.store.blobs import BlobStore
from service.store.datasets import DatasetStore
from service.store.db import Database
from service.store.labels import DatasetLabels, LabelUpdate
from service.training import TrainRequest
from tests.unit.test_datasets import image_bytes, make_zip

TENANT = "acme"
OTHER = "globex"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path, max_image_bytes=20_000, max_images_per_dataset=10, max_classes=3, max_label_updates=4
    )


@pytest.fixture
def store(settings: Settings) -> DatasetStore:
    db = Database(settings.resolved_registry_url)
    return DatasetStore(db, BlobStore(settings.blob_dir), settings, Quotas(settings))


@pytest.fixture
def labels(store: DatasetStore, settings: Settings) -> DatasetLabels:
    return DatasetLabels(store.db, settings)


def files(count: int) -> list[tuple[str, bytes]]:
    return [(f"img_{i}.png", image_bytes(seed=i)) for i in range(count)]


def pool(store: DatasetStore, count: int = 4, client_ids: tuple[str, ...] = ()) -> str:
    return store.create_from_labelled(TENANT, "pool", files(count), [], list(client_ids)).id


# -- uploads -----------------------------------------------------------------------------------------------------------


def test_files_without_labels_make_a_pool_and_empty_labels_a_mix(store):
    unlabelled = store.create_from_labelled(TENANT, "pool", files(3), [])
    mixed = store.create_from_labelled(TENANT, "mix", files(3), ["cat", "", "cat"])
    assert (unlabelled.num_labelled, unlabelled.num_unlabelled, unlabelled.classes) == (0, 3, [])
    assert (mixed.num_labelled, mixed.num_unlabelled, mixed.classes, mixed.counts) == (2, 1, ["cat"], {"cat": 2})
    assert store.get(TENANT, mixed.id) == mixed
    assert [e.index for e in store.unlabelled_examples(TENANT, mixed.id)] == [1]
    assert [(e.index, e.label) for e in store.labelled_examples(TENANT, mixed.id)] == [(0, "cat"), (2, "cat")]


def test_a_flat_zip_is_a_pool_and_root_images_beside_class_folders_are_unlabelled(store):
    flat = store.create_from_zip(TENANT, "flat", make_zip({"a.png": image_bytes(seed=1), "b.png": image_bytes(seed=2)}))
    mixed = store.create_from_zip(
        TENANT,
        "mixed",
        make_zip(
            {
                "photos/cat/1.png": image_bytes(seed=1),
                "photos/dog/2.png": image_bytes(seed=2),
                "photos/3.png": image_bytes(seed=3),
            }
        ),
    )
    assert (flat.num_labelled, flat.num_unlabelled) == (0, 2)
    assert [(e.file_name, e.label) for e in store.list_examples(TENANT, mixed.id)[0]] == [
        ("photos/3.png", None),
        ("photos/cat/1.png", "cat"),
        ("photos/dog/2.png", "dog"),
    ]


def test_a_fully_labelled_upload_still_needs_two_classes_and_the_upload_bounds_hold(store):
    with pytest.raises(InvalidArgument, match="only one class"):
        store.create_from_labelled(TENANT, "one", files(2), ["cat", "cat"])
    with pytest.raises(InvalidArgument, match="more than 10 images"):
        store.create_from_labelled(TENANT, "big", files(11), [])
    with pytest.raises(InvalidArgument, match="label of file 'img_1.png' is empty"):
        store.create_from_labelled(TENANT, "blank", files(2), ["cat", "  "])
    assert store.list(TENANT) == ([], None)


# -- labelling in the store --------------------------------------------------------------------------------------------


def test_labels_are_set_by_client_id_or_position_and_cleared_with_none(store, labels):
    dataset = pool(store, 3, ("a", "b", "c"))
    updated = labels.update(
        TENANT, dataset, [LabelUpdate(example="a", label="cat"), LabelUpdate(example="2", label="dog")]
    )
    assert [(e.index, e.label) for e in updated] == [(0, "cat"), (2, "dog")]
    info = store.get(TENANT, dataset)
    assert (info.classes, info.num_labelled, info.num_unlabelled) == (["cat", "dog"], 2, 1)
    labels.update(TENANT, dataset, [LabelUpdate(example="c", label=None)])
    assert store.get(TENANT, dataset).classes == ["cat"]
    assert [e.index for e in store.unlabelled_examples(TENANT, dataset)] == [1, 2]


@pytest.mark.parametrize(
    ("updates", "error", "message"),
    [
        ([("zz", "cat")], NotFound, "no example 'zz'"),
        ([("7", "cat")], NotFound, "no example '7'"),
        ([("a", "x" * 129)], InvalidArgument, "over the limit of 128"),
        ([("a", "ca\x00t")], InvalidArgument, "control characters"),
        ([("a", " ")], InvalidArgument, "is empty"),
        ([("a", "cat"), ("0", "dog")], InvalidArgument, "update 2 labels example 0 again"),
        ([(str(i), "cat") for i in range(5)], InvalidArgument, "5 label updates in one call, over the limit of 4"),
        ([], InvalidArgument, "no label updates"),
        ([("a", "dog"), ("b", "bird"), ("c", "fish")], InvalidArgument, "4 classes, over the limit of 3"),
    ],
    ids=["unknown", "position", "long", "control", "blank", "twice", "too many", "none", "classes"],
)
def test_bad_label_updates_are_refused_and_change_nothing(store, labels, updates, error, message):
    dataset = store.create_from_labelled(
        TENANT, "pool", [*files(3), ("d.png", image_bytes(seed=9))], [], ["a", "b", "c", "d"]
    ).id
    labels.update(TENANT, dataset, [LabelUpdate(example="d", label="cat")])
    with pytest.raises(error, match=message):
        labels.update(TENANT, dataset, [LabelUpdate(example=e, label=label) for e, label in updates])
    assert [(e.index, e.label) for e in store.list_examples(TENANT, dataset)[0]] == [
        (0, None),
        (1, None),
        (2, None),
        (3, "cat"),
    ]


def test_another_tenants_dataset_is_not_found_for_every_label_call(store, labels):
    dataset = pool(store, 2, ("a", "b"))
    with pytest.raises(NotFound, match="not found"):
        labels.update(OTHER, dataset, [LabelUpdate(example="a", label="cat")])
    with pytest.raises(NotFound, match="not found"):
        labels.import_csv(OTHER, dataset, b"img_0.png,cat\n")
    with pytest.raises(NotFound):
        store.unlabelled_examples(OTHER, dataset)
    with pytest.raises(NotFound):
        store.labelled_examples(OTHER, dataset)
    assert store.get(TENANT, dataset).num_unlabelled == 2


def test_an_import_labels_by_file_name_or_client_id_and_empty_labels_unlabel(store, labels):
    dataset = pool(store, 4, ("a", "b", "c", "d"))
    imported = labels.import_csv(TENANT, dataset, b'file,label\nimg_0.png,cat\nb,dog\n\n"img_2.png","big, dog"\n')
    assert (imported.rows, imported.num_labelled, imported.num_unlabelled) == (3, 3, 1)
    labels.import_csv(TENANT, dataset, b"img_2.png,\n")
    assert [e.label for e in store.list_examples(TENANT, dataset)[0]] == ["cat", "dog", None, None]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"img_0.png,cat\nnope.png,dog\n", "row 2: the dataset has no example with file name or client id 'nope.png'"),
        (b"img_0.png,cat\ndup.png,dog\n", r"row 2: file name 'dup.png' names several examples \(positions 2, 3\)"),
        (b"img_0.png,cat\nimg_1.png,dog\nimg_0.png,cat\n", "row 3 labels example 0 again"),
        (b"img_0.png,cat\nimg_1.png,\x01\n", "row 2.*control characters"),
        (b"img_0.png,cat\nimg_1.png,dog,extra\n", "row 2 has 3 fields"),
        (b"img_0.png,cat\n,dog\n", "row 2: the file is empty"),
        (b"img_0.png," + b"x" * 129 + b"\n", "row 1.*over the limit of 128"),
        (b"\xff\xfe,cat\n", "not UTF-8"),
        (b"file,label\n", "no rows"),
        (b"".join(b"img_0.png,cat\n" for _ in range(11)), "11 rows"),
        (b"x" * 70_000, "over the limit of 65,536"),
    ],
    ids=[
        "unknown",
        "ambiguous",
        "duplicated",
        "control",
        "fields",
        "no file",
        "long",
        "encoding",
        "empty",
        "rows",
        "bytes",
    ],
)
def test_bad_imports_are_refused_naming_the_row_and_change_nothing(store, labels, settings, text, message):
    settings.max_label_import_bytes = 65_536
    dataset = store.create_from_labelled(
        TENANT, "pool", [*files(2), ("dup.png", image_bytes(seed=7)), ("dup.png", image_bytes(seed=8))], []
    ).id
    with pytest.raises(InvalidArgument, match=message):
        labels.import_csv(TENANT, dataset, text)
    assert store.get(TENANT, dataset).num_unlabelled == 4


def test_two_label_calls_at_once_both_apply_within_the_class_bound(registry_url, tmp_path):
    settings = Settings(data_dir=tmp_path, registry_url=registry_url, max_images_per_dataset=10, max_classes=3)
    db = Database(registry_url)
    store = DatasetStore(db, BlobStore(settings.blob_dir), settings, Quotas(settings))
    labels = DatasetLabels(db, settings)
    dataset = store.create_from_labelled(TENANT, "pool", files(4), ["a", "b", "", ""], ["w", "x", "y", "z"]).id
    start, outcomes = threading.Barrier(2), []

    def label(example: str, name: str) -> None:
        start.wait()
        try:
            labels.update(TENANT, dataset, [LabelUpdate(example=example, label=name)])
            outcomes.append("ok")
        except InvalidArgument as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=label, args=args) for args in (("y", "c"), ("z", "d"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    info = store.get(TENANT, dataset)
    assert outcomes.count("ok") == 1  # one new class fits, the other is refused whole
    assert any("over the limit of 3" in outcome for outcome in outcomes)
    assert len(info.classes) == 3 and info.num_unlabelled == 1
    db.close()


# -- migration 0010 ----------------------------------------------------------------------------------------------------


def test_migration_0010_keeps_existing_labels_and_lets_new_examples_be_unlabelled(registry_url, tmp_path):
    engine = sa.create_engine(registry_url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(migrate.MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0009")
        connection.execute(
            sa.text(
                "INSERT INTO datasets (id, tenant, name, created_at, num_examples, classes, stored_bytes) "
                "VALUES ('ds_1', 'acme', 'old', '2026-01-01 00:00:00', 2, '[\"a\", \"b\"]', 0)"
            )
        )
        for position, label in enumerate(("a", "b")):
            connection.execute(
                sa.text(
                    "INSERT INTO examples (dataset_id, image_sha256, label, position, file_name) "
                    "VALUES ('ds_1', :sha, :label, :position, :name)"
                ),
                {"sha": f"{position:064d}", "label": label, "position": position, "name": f"{label}.png"},
            )
    engine.dispose()
    settings = Settings(data_dir=tmp_path, registry_url=registry_url)
    db = Database(registry_url)  # migrates to the newest revision
    store = DatasetStore(db, BlobStore(settings.blob_dir), settings, Quotas(settings))
    DatasetLabels(db, settings).update("acme", "ds_1", [LabelUpdate(example="1", label=None)])
    info = store.get("acme", "ds_1")
    assert (info.classes, info.num_labelled, info.num_unlabelled) == (["a"], 1, 1)
    assert [(e.file_name, e.label) for e in store.list_examples("acme", "ds_1")[0]] == [("a.png", "a"), ("b.png", None)]
    db.close()


# -- training records what it used -------------------------------------------------------------------------------------


@pytest.fixture
def runtime(make_core, tmp_path) -> Runtime:
    runtime = Runtime.around(make_core(tmp_path))
    for tenant in (TENANT, OTHER):
        runtime.tenants.create_tenant(tenant)
    return runtime


@pytest.fixture
def keys(runtime) -> dict[str, str]:
    return {tenant: runtime.tenants.create_key(tenant).secret for tenant in (TENANT, OTHER)}


def garments() -> list[tuple[str, bytes, str]]:
    """Real images of three classes; (file name, bytes, class)."""
    pngs = fashion_mnist_pngs("train", per_class=4, seed=3)
    return [
        (f"{label}_{i}.png", data, label)
        for i, (data, label) in enumerate(pngs)
        if label in ("bag", "sneaker", "trouser")
    ]


def test_training_uses_only_labelled_examples_and_records_them_unchanged_by_relabelling(runtime):
    core = runtime.core
    images = garments()
    given = ["" if i % 4 == 3 else label for i, (_, _, label) in enumerate(images)]  # every fourth unlabelled
    dataset = core.datasets.create_from_labelled(TENANT, "garments", [(n, d) for n, d, _ in images], given)
    before = labelled_set(core.datasets, TENANT, dataset.id)
    version = core.trainer.train(TENANT, TrainRequest(dataset_id=dataset.id, head_name="g", kind="prototype"))
    metrics = core.heads.describe(TENANT, f"g@{version.version}").metrics
    used = [i for i, label in enumerate(given) if label]
    assert metrics["examples_used"] == len(used) == dataset.num_labelled
    assert metrics["training_examples"]["positions"] == used
    assert [version.classes[i] for i in metrics["training_examples"]["labels"]] == [given[i] for i in used]
    assert metrics["examples_digest"] == before.digest

    core.labels.update(
        TENANT, dataset.id, [LabelUpdate(example="0", label=None), LabelUpdate(example="3", label="bag")]
    )
    again = core.heads.describe(TENANT, f"g@{version.version}").metrics
    assert again["training_examples"] == metrics["training_examples"]
    assert (
        again["examples_digest"] == metrics["examples_digest"] != labelled_set(core.datasets, TENANT, dataset.id).digest
    )


def test_an_audit_reads_only_the_labelled_examples_and_names_them_by_dataset_position(runtime):
    core = runtime.core
    images = garments()
    given = ["" if i % 3 == 0 else label for i, (_, _, label) in enumerate(images)]
    dataset = core.datasets.create_from_labelled(TENANT, "garments", [(n, d) for n, d, _ in images], given)
    audit = DatasetAudit.of(core.auditor.audit(TENANT, AuditRequest(dataset_id=dataset.id, duplicate_similarity=0.5)))
    named = [s.example for s in audit.suspects] + [e for d in audit.duplicates for e in (d.first, d.second)]
    assert audit.example_count == dataset.num_labelled
    assert named and all(given[e.index] == e.label and e.file_name == images[e.index][0] for e in named)


def test_training_a_dataset_without_two_labelled_classes_fails_clearly(runtime):
    core = runtime.core
    dataset = core.datasets.create_from_labelled(
        TENANT, "pool", [(n, d) for n, d, _ in garments()[:4]], ["bag", "", "", ""]
    )
    with pytest.raises(FailedPrecondition, match="has only class 'bag' .3 unlabelled.; label examples of at least two"):
        core.trainer.cost(TENANT, TrainRequest(dataset_id=dataset.id, head_name="g", kind="prototype"))
    with pytest.raises(FailedPrecondition, match="label examples of at least two classes"):
        core.trainer.train(TENANT, TrainRequest(dataset_id=dataset.id, head_name="g", kind="prototype"))


# -- both doors and the client -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_uploads_a_pool_and_labels_one_a_batch_and_an_import(runtime, keys):
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:

        def auth(tenant: str = TENANT) -> dict[str, str]:
            return {"Authorization": f"Bearer {keys[tenant]}"}

        multipart = [("files", (name, data, "image/png")) for name, data in files(4)]
        created = await client.post(
            "/v1/datasets",
            data={"display_name": "pool", "client_ids": ["a", "b", "c", "d"]},
            files=multipart,
            headers=auth(),
        )
        assert created.status_code == 201, created.text
        dataset = created.json()["name"]
        one = await client.patch(f"/v1/{dataset}/examples/a", json={"label": "cat"}, headers=auth())
        masked = await client.patch(
            f"/v1/{dataset}/examples/1", params={"update_mask": "label"}, json={"label": "dog"}, headers=auth()
        )
        bad_mask = await client.patch(
            f"/v1/{dataset}/examples/1", params={"update_mask": "file_name"}, json={"label": "dog"}, headers=auth()
        )
        batch = await client.post(
            f"/v1/{dataset}/examples:batchUpdate",
            json={"updates": [{"example": "c", "label": "cat"}, {"example": "a", "label": None}]},
            headers=auth(),
        )
        imported = await client.post(
            f"/v1/{dataset}/examples:importLabels",
            content=b"file,label\nimg_3.png,dog\n",
            headers=auth() | {"Content-Type": "text/csv"},
        )
        unknown_row = await client.post(
            f"/v1/{dataset}/examples:importLabels",
            content=b"nope.png,dog\n",
            headers=auth() | {"Content-Type": "text/csv"},
        )
        theirs = await client.patch(f"/v1/{dataset}/examples/a", json={"label": "cat"}, headers=auth(OTHER))
        their_batch = await client.post(
            f"/v1/{dataset}/examples:batchUpdate",
            json={"updates": [{"example": "a", "label": "x"}]},
            headers=auth(OTHER),
        )
        their_import = await client.post(
            f"/v1/{dataset}/examples:importLabels", content=b"a,x\n", headers=auth(OTHER) | {"Content-Type": "text/csv"}
        )
        missing = await client.patch(f"/v1/{dataset}/examples/zz", json={"label": "cat"}, headers=auth())
        after = await client.get(f"/v1/{dataset}", headers=auth())
    assert created.json()["unlabelled_example_count"] == 4 and created.json()["labelled_example_count"] == 0
    assert (one.status_code, one.json()["label"], masked.json()["label"]) == (200, "cat", "dog")
    assert bad_mask.status_code == 422 and "update_mask" in bad_mask.text  # the schema's pattern: 'label' or '*'
    assert [e["label"] for e in batch.json()["examples"]] == ["cat", None]
    assert imported.json()["row_count"] == 1
    assert unknown_row.status_code == 400 and "row 1" in unknown_row.json()["message"]
    assert theirs.status_code == their_batch.status_code == their_import.status_code == missing.status_code == 404
    assert theirs.json()["message"].startswith(f"dataset '{dataset.removeprefix('datasets/')}' not found")
    assert after.json()["examples_per_class"] == {"cat": 1, "dog": 2}
    assert after.json()["unlabelled_example_count"] == 1


@pytest.mark.anyio
async def test_grpc_labels_one_a_batch_and_an_import_and_hides_other_tenants_datasets(runtime, keys):
    dataset = runtime.core.datasets.create_from_labelled(TENANT, "pool", files(3), [], ["a", "b", "c"])
    name = f"datasets/{dataset.id}"
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rpc.DatasetServiceStub(channel)
            mine = [("authorization", f"Bearer {keys[TENANT]}")]
            one = await stub.UpdateExample(
                api.UpdateExampleRequest(
                    example=pb.Example(name=f"{name}/examples/a", label="cat"),
                    update_mask=field_mask_pb2.FieldMask(paths=["label"]),
                ),
                metadata=mine,
            )
            batch = await stub.BatchUpdateExamples(
                api.BatchUpdateExamplesRequest(parent=name, updates=[api.ExampleLabel(example="1", label="dog")]),
                metadata=mine,
            )
            imported = await stub.ImportLabels(api.ImportLabelsRequest(parent=name, csv=b"c,dog\na,\n"), metadata=mine)
            refused = {}
            for case, call in [
                (
                    "theirs",
                    lambda: stub.BatchUpdateExamples(
                        api.BatchUpdateExamplesRequest(parent=name, updates=[api.ExampleLabel(example="a", label="x")]),
                        metadata=[("authorization", f"Bearer {keys[OTHER]}")],
                    ),
                ),
                (
                    "unknown",
                    lambda: stub.UpdateExample(
                        api.UpdateExampleRequest(example=pb.Example(name=f"{name}/examples/zz", label="x")),
                        metadata=mine,
                    ),
                ),
                (
                    "long",
                    lambda: stub.UpdateExample(
                        api.UpdateExampleRequest(example=pb.Example(name=f"{name}/examples/a", label="x" * 200)),
                        metadata=mine,
                    ),
                ),
                (
                    "mask",
                    lambda: stub.UpdateExample(
                        api.UpdateExampleRequest(
                            example=pb.Example(name=f"{name}/examples/a", label="x"),
                            update_mask=field_mask_pb2.FieldMask(paths=["file_name"]),
                        ),
                        metadata=mine,
                    ),
                ),
                (
                    "duplicated",
                    lambda: stub.ImportLabels(api.ImportLabelsRequest(parent=name, csv=b"a,x\na,y\n"), metadata=mine),
                ),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call()
                refused[case] = error.value.code()
    finally:
        await server.stop(grace=1)
    assert (one.label, one.index, [e.label for e in batch.examples]) == ("cat", 0, ["dog"])
    counts = (imported.dataset.labelled_example_count, imported.dataset.unlabelled_example_count)
    assert (imported.row_count, counts) == (2, (2, 1))
    assert dict(imported.dataset.examples_per_class) == {"dog": 2}
    assert refused == {
        "theirs": grpc.StatusCode.NOT_FOUND,
        "unknown": grpc.StatusCode.NOT_FOUND,
        "long": grpc.StatusCode.INVALID_ARGUMENT,
        "mask": grpc.StatusCode.INVALID_ARGUMENT,
        "duplicated": grpc.StatusCode.INVALID_ARGUMENT,
    }


@pytest.mark.anyio
@pytest.mark.parametrize("door", ["http", "grpc"])
async def test_both_clients_label_one_a_batch_and_an_import_alike(runtime, keys, door):
    dataset = runtime.core.datasets.create_from_labelled(TENANT, "pool", files(4), [], ["a", "b", "c", "d"])

    def label(client) -> tuple:
        one = client.label_example(dataset.id, "a", "cat")
        batch = client.label_examples(dataset.id, {"b": "dog", "a": None})
        imported = client.import_labels(dataset.id, b"img_2.png,cat\n")
        return one, batch, imported, client.list_examples(dataset.id)

    if door == "http":
        with serve_http(runtime) as port, HttpClient(f"http://127.0.0.1:{port}", keys[TENANT]) as client:
            one, batch, imported, listed = await asyncio.to_thread(label, client)
    else:
        server = await start_grpc_server(runtime, 0, host="127.0.0.1")
        try:
            with GrpcClient(f"127.0.0.1:{server.port}", keys[TENANT]) as client:
                one, batch, imported, listed = await asyncio.to_thread(label, client)
        finally:
            await server.stop(grace=1)
    assert (one.label, [e.label for e in batch]) == ("cat", ["dog", None])
    assert (imported.row_count, imported.dataset.labelled_example_count, imported.dataset.unlabelled_example_count) == (
        1,
        2,
        2,
    )
    assert [e.label for e in listed] == [None, "dog", "cat", None]


@pytest.mark.anyio
async def test_graft_label_sets_one_label_and_imports_a_csv(runtime, keys, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "shots"
    folder.mkdir()
    for name, data in files(3):
        (folder / name).write_bytes(data)
    (tmp_path / "labels.csv").write_text("file,label\nimg_1.png,dog\nimg_2.png,cat\n")
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setenv("GRAFT_API_KEY", keys[TENANT])
    with serve_http(runtime) as port:
        url = f"http://127.0.0.1:{port}"

        def run(*args: str) -> int:
            return cli.main(["--url", url, *args])

        assert await asyncio.to_thread(run, "upload", str(folder), "--name", "shots") == 0
        uploaded = capsys.readouterr().out
        assert await asyncio.to_thread(run, "label", "shots", "0", "cat") == 0
        one = capsys.readouterr().out
        assert await asyncio.to_thread(run, "label", "shots", "--import", str(tmp_path / "labels.csv")) == 0
        imported = capsys.readouterr().out
        assert await asyncio.to_thread(run, "label", "shots", "0") == 2
    assert "3 images, 0 classes" in uploaded and "3 unlabelled" in uploaded
    assert one.split()[-1] == "cat"
    assert "2 rows applied" in imported and "3 labelled in 2 classes, 0 unlabelled" in imported
