"""HeadRegistry: versions, aliases, refs, tenancy and atomic writes of head weights."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.errors import InvalidArgument, NotFound
from service.store.blobs import BlobStore
from service.store.db import Database, HeadVersionRow
from service.store.heads import HeadRegistry, HeadVersionInfo

TENANT = "acme"


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'registry.db'}")


@pytest.fixture
def registry(db: Database, blobs: BlobStore) -> HeadRegistry:
    return HeadRegistry(db, blobs)


def create(registry: HeadRegistry, name: str = "cats", tenant: str = TENANT, **overrides: Any) -> HeadVersionInfo:
    fields: dict[str, Any] = {
        "tensors": {"weight": torch.randn(3, 8), "bias": torch.zeros(3)},
        "backbone": "mobilenet_v2",
        "split_point": None,
        "kind": "linear",
        "classes": ["a", "b", "c"],
        "config": {"dropout": 0.1},
        "hyperparams": {"lr": 0.01},
        "metrics": {"accuracy": 0.9},
        "dataset_id": "ds_1",
        **overrides,
    }
    return registry.create_version(tenant, name, **fields)


def named_blob_files(blobs: BlobStore) -> list[Path]:
    return [p for p in (blobs.root / "named").rglob("*") if p.is_file()]


def test_versions_increment_per_tenant_and_name(registry: HeadRegistry) -> None:
    assert [create(registry).version for _ in range(3)] == [1, 2, 3]
    assert create(registry, "dogs").version == 1
    assert create(registry, tenant="other").version == 1
    head = registry.get(TENANT, "cats")
    assert head.latest_version == 3 and [v.version for v in head.versions] == [1, 2, 3]
    assert head.aliases == {"latest": 3}


def test_weights_round_trip_through_safetensors(registry: HeadRegistry) -> None:
    weight = torch.randn(3, 8)
    info = create(registry, tensors={"weight": weight, "view": weight[:1]}, job_id="job_1")
    loaded = registry.load_tensors(info)
    torch.testing.assert_close(loaded["weight"], weight)
    torch.testing.assert_close(loaded["view"], weight[:1])
    assert info.param_bytes == (24 + 8) * 4 and info.job_id == "job_1"
    assert registry.head_blob_bytes(info)[8:9] == b"{"  # safetensors: u64 header length, then JSON
    assert "blob_key" not in info.model_dump()


@pytest.mark.parametrize("name", ["Cats", "1cats", "", "cats_v2", "a" * 64, "../x", "cats@1"])
def test_invalid_head_names_are_refused(registry: HeadRegistry, blobs: BlobStore, name: str) -> None:
    with pytest.raises(InvalidArgument, match="head name .* is invalid"):
        create(registry, name)
    assert not (blobs.root / "named").exists() or named_blob_files(blobs) == []


def test_resolve_name_version_and_alias(registry: HeadRegistry) -> None:
    for _ in range(3):
        create(registry)
    registry.set_alias(TENANT, "cats", "prod", 2)

    assert registry.resolve(TENANT, "cats").version == 3
    assert registry.resolve(TENANT, "cats:latest").version == 3
    assert registry.resolve(TENANT, "cats@1").version == 1
    prod = registry.resolve(TENANT, "cats:prod")
    assert prod.version == 2 and prod.aliases == ["prod"]


@pytest.mark.parametrize(
    "ref", ["", "cats@", "cats@x", "cats:", "cats@1:prod", "Cats", "cats@-1", "cats:Prod", " cats"]
)
def test_malformed_refs_are_invalid_argument(registry: HeadRegistry, ref: str) -> None:
    create(registry)
    with pytest.raises(InvalidArgument, match="is malformed"):
        registry.resolve(TENANT, ref)


@pytest.mark.parametrize("ref", ["dogs", "cats@9", "cats@0", "cats:prod"])
def test_unknown_refs_are_not_found(registry: HeadRegistry, ref: str) -> None:
    create(registry)
    with pytest.raises(NotFound):
        registry.resolve(TENANT, ref)


def test_another_tenants_head_is_not_found_like_an_unknown_one(registry: HeadRegistry) -> None:
    create(registry, "theirs", tenant="other")
    with pytest.raises(NotFound) as foreign:
        registry.resolve(TENANT, "theirs")
    with pytest.raises(NotFound) as unknown:
        registry.resolve(TENANT, "nothere")
    assert str(foreign.value) == str(unknown.value).replace("nothere", "theirs")
    for call in (
        lambda: registry.get(TENANT, "theirs"),
        lambda: registry.delete_head(TENANT, "theirs"),
        lambda: registry.delete_version(TENANT, "theirs", 1),
        lambda: registry.set_alias(TENANT, "theirs", "prod", 1),
    ):
        with pytest.raises(NotFound):
            call()
    assert registry.list(TENANT) == ([], None)
    assert registry.resolve("other", "theirs").version == 1


def test_aliases_move_and_are_removed(registry: HeadRegistry) -> None:
    create(registry)
    create(registry)
    registry.set_alias(TENANT, "cats", "prod", 1)
    registry.set_alias(TENANT, "cats", "prod", 2)
    assert registry.resolve(TENANT, "cats:prod").version == 2
    assert registry.get(TENANT, "cats").aliases == {"prod": 2, "latest": 2}

    registry.remove_alias(TENANT, "cats", "prod")
    with pytest.raises(NotFound, match="no alias 'prod'"):
        registry.resolve(TENANT, "cats:prod")
    with pytest.raises(NotFound):
        registry.remove_alias(TENANT, "cats", "prod")


def test_alias_rules(registry: HeadRegistry) -> None:
    create(registry)
    with pytest.raises(InvalidArgument, match="'latest'"):
        registry.set_alias(TENANT, "cats", "latest", 1)
    with pytest.raises(InvalidArgument, match="alias 'Prod!' is invalid"):
        registry.set_alias(TENANT, "cats", "Prod!", 1)
    with pytest.raises(NotFound, match="no version 7"):
        registry.set_alias(TENANT, "cats", "prod", 7)


def test_delete_version_drops_its_aliases_and_weights(registry: HeadRegistry, blobs: BlobStore) -> None:
    first, second = create(registry), create(registry)
    registry.set_alias(TENANT, "cats", "prod", 2)
    registry.set_alias(TENANT, "cats", "stable", 1)

    registry.delete_version(TENANT, "cats", 2)

    head = registry.get(TENANT, "cats")
    assert [v.version for v in head.versions] == [1]
    assert head.aliases == {"stable": 1, "latest": 1}
    with pytest.raises(NotFound):
        registry.head_blob_bytes(second)
    assert registry.load_tensors(first).keys() == {"weight", "bias"}
    assert create(registry).version == 2  # numbers continue from the highest remaining version


def test_delete_head_removes_everything(registry: HeadRegistry, blobs: BlobStore) -> None:
    create(registry)
    create(registry)
    registry.set_alias(TENANT, "cats", "prod", 1)
    registry.delete_head(TENANT, "cats")
    with pytest.raises(NotFound):
        registry.get(TENANT, "cats")
    assert named_blob_files(blobs) == []
    assert create(registry).version == 1 and create(registry).aliases == ["latest"]


def test_failed_commit_leaves_no_row_and_no_blob(
    registry: HeadRegistry, db: Database, blobs: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    create(registry)
    blobs_before = named_blob_files(blobs)

    def broken_commit(self: object) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr("sqlalchemy.orm.Session.commit", broken_commit)
    with pytest.raises(RuntimeError, match="went away"):
        create(registry)
    monkeypatch.undo()

    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(HeadVersionRow)) == 1
    assert named_blob_files(blobs) == blobs_before
    assert registry.get(TENANT, "cats").latest_version == 1


def test_concurrent_writer_taking_the_version_number_is_retried(
    registry: HeadRegistry, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica commits version 2 after we read max() == 1 but before our commit."""
    create(registry)
    other_replica = HeadRegistry(Database(str(db.engine.url)), registry.blobs)
    real_session = db.session
    raced: list[HeadVersionInfo] = []

    @contextmanager
    def racing_session() -> Iterator[Session]:
        with real_session() as session:
            yield session
            if not raced:
                raced.append(create(other_replica))

    monkeypatch.setattr(db, "session", racing_session)
    info = create(registry)

    assert raced[0].version == 2 and info.version == 3
    assert [v.version for v in registry.get(TENANT, "cats").versions] == [1, 2, 3]
    assert registry.load_tensors(info).keys() == {"weight", "bias"}


def test_list_pages_walk_every_head_once(registry: HeadRegistry) -> None:
    names = [f"head-{i}" for i in range(5)]
    for name in reversed(names):
        create(registry, name)
    create(registry, "head-0")
    create(registry, "zzz", tenant="other")

    seen, token = [], None
    while True:
        page, token = registry.list(TENANT, page_size=2, page_token=token)
        seen += [(head.name, head.latest_version) for head in page]
        if token is None:
            break
    assert seen == [("head-0", 2), ("head-1", 1), ("head-2", 1), ("head-3", 1), ("head-4", 1)]


@pytest.mark.parametrize("token", ["%%%", "bm90IGpzb24", "WyJhIiwgImIiXQ", "WzFd"])
def test_malformed_head_page_token_is_invalid_argument(registry: HeadRegistry, token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        registry.list(TENANT, page_token=token)
