"""HeadRegistry: versions, aliases, refs, tenancy and atomic writes of head weights, on SQLite and PostgreSQL."""

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.db import Database, HeadVersionRow
from service.store.heads import MAX_VERSION, HeadRegistry, HeadVersionInfo
from service.store.pages import encode_token

TENANT = "acme"


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def db(registry_url: str) -> Database:
    """Every registry test runs on SQLite and on a real PostgreSQL."""
    return Database(registry_url)


@pytest.fixture
def registry(db: Database, blobs: BlobStore, tmp_path: Path) -> HeadRegistry:
    return HeadRegistry(db, blobs, Quotas(Settings(data_dir=tmp_path)))


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


@pytest.mark.parametrize("name", ["Cats", "1cats", "", "cats_v2", "a" * 64, "../x", "cats@1", "cats\n", "ca\x00ts"])
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
    assert registry.resolve(TENANT, "cats:prod").version == 2
    prod = registry.describe(TENANT, "cats:prod")
    assert prod.version == 2 and prod.aliases == ["prod"] and prod.metrics == {"accuracy": 0.9}


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "cats@",
        "cats@x",
        "cats:",
        "cats@1:prod",
        "Cats",
        "cats@-1",
        "cats:Prod",
        " cats",
        "cats\n",
        "cats@1\n",
        "cats:prod\n",
        "cats@\u00b2",
        "cats\x00",
        "cats@1\x00",
        "cats:pr\x00od",
    ],
)
def test_malformed_refs_are_invalid_argument(registry: HeadRegistry, ref: str) -> None:
    create(registry)
    with pytest.raises(InvalidArgument, match="is malformed"):
        registry.resolve(TENANT, ref)


@pytest.mark.parametrize("ref", ["dogs", "cats@9", "cats@2147483647", "cats:prod"])
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
    assert create(registry).version == 3  # a deleted version's number is never given again


def test_delete_head_removes_everything(registry: HeadRegistry, blobs: BlobStore) -> None:
    create(registry)
    create(registry)
    registry.set_alias(TENANT, "cats", "prod", 1)
    registry.delete_head(TENANT, "cats")
    with pytest.raises(NotFound):
        registry.get(TENANT, "cats")
    assert named_blob_files(blobs) == []
    again = create(registry)
    assert again.version == 3 and again.aliases == ["latest"]  # numbers of the deleted head are not reused


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


def test_concurrent_creators_of_a_new_head_get_distinct_versions(registry: HeadRegistry, db: Database) -> None:
    """Two replicas creating the same head at once: each gets its own number, none is lost."""
    other_replica = HeadRegistry(
        Database(db.engine.url.render_as_string(hide_password=False)), registry.blobs, registry.quotas
    )
    with ThreadPoolExecutor(max_workers=4) as pool:
        infos = list(pool.map(lambda i: create(registry if i % 2 else other_replica), range(8)))
    assert sorted(info.version for info in infos) == list(range(1, 9))
    assert [v.version for v in registry.get(TENANT, "cats").versions] == list(range(1, 9))


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


def test_a_deleted_versions_number_is_never_given_again(registry: HeadRegistry) -> None:
    create(registry)
    create(registry)
    registry.delete_version(TENANT, "cats", 2)
    assert create(registry).version == 3
    registry.delete_head(TENANT, "cats")
    assert create(registry).version == 4


def test_a_guard_that_raises_commits_nothing_and_removes_the_blob(
    registry: HeadRegistry, db: Database, blobs: BlobStore
) -> None:
    class LeaseLost(Exception):
        pass

    def lost_lease(session: Session) -> None:
        assert session.scalar(select(func.count()).select_from(HeadVersionRow)) == 0  # runs inside the transaction
        raise LeaseLost("job lease expired")

    with pytest.raises(LeaseLost):
        create(registry, guard=lost_lease)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(HeadVersionRow)) == 0
    assert named_blob_files(blobs) == []
    assert create(registry, guard=lambda session: None).version == 1  # the refused attempt used no number


def test_head_quotas_are_enforced_when_the_version_is_inserted(db: Database, blobs: BlobStore, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, quota_head_versions=2, quota_heads=1)
    registry = HeadRegistry(db, blobs, Quotas(settings))
    create(registry)
    with pytest.raises(ResourceExhausted, match="GRAFT_QUOTA_HEADS"):
        create(registry, "dogs")
    create(registry)
    with pytest.raises(ResourceExhausted, match="GRAFT_QUOTA_HEAD_VERSIONS"):
        create(registry)
    assert len(named_blob_files(blobs)) == 2
    assert [v.version for v in registry.get(TENANT, "cats").versions] == [1, 2]


def test_corrupt_weights_are_a_clear_error_not_garbage(registry: HeadRegistry, blobs: BlobStore) -> None:
    info = create(registry)
    (path,) = named_blob_files(blobs)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a tensor: still a loadable safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition, match="version 1 are corrupt.*train it again"):
        registry.load_tensors(info)


def test_collect_orphans_removes_only_old_unreferenced_weight_files(registry: HeadRegistry, blobs: BlobStore) -> None:
    kept = create(registry)
    orphan = blobs.root / "named" / "heads" / "crashed-before-commit.safetensors"
    orphan.write_bytes(b"weights of a version whose row was never committed")
    assert registry.collect_orphans(grace_s=3600) == 0  # young: may belong to a version being created
    old = time.time() - 7200
    for path in named_blob_files(blobs):
        os.utime(path, (old, old))
    assert registry.collect_orphans(grace_s=3600) == 1
    assert not orphan.exists()
    assert registry.load_tensors(kept).keys() == {"weight", "bias"}


@pytest.mark.parametrize("version", [0, -1, MAX_VERSION + 1, 10**20, True])
def test_version_numbers_out_of_range_are_invalid_argument(registry: HeadRegistry, version: int) -> None:
    create(registry)
    with pytest.raises(InvalidArgument, match="out of range"):
        registry.delete_version(TENANT, "cats", version)
    with pytest.raises(InvalidArgument, match="out of range"):
        registry.set_alias(TENANT, "cats", "prod", version)


@pytest.mark.parametrize("ref", ["cats@0", "cats@2147483648", "cats@99999999999", "cats@" + "9" * 5000])
def test_references_to_versions_out_of_range_are_invalid_argument(registry: HeadRegistry, ref: str) -> None:
    create(registry)
    with pytest.raises(InvalidArgument, match="out of range"):
        registry.resolve(TENANT, ref)


@pytest.mark.parametrize("name", ["cats\x00", "cats\n", "Cats"])
def test_every_lookup_refuses_an_invalid_name_before_the_database(registry: HeadRegistry, name: str) -> None:
    create(registry)
    for call in (
        lambda: registry.get(TENANT, name),
        lambda: registry.delete_head(TENANT, name),
        lambda: registry.delete_version(TENANT, name, 1),
        lambda: registry.set_alias(TENANT, name, "prod", 1),
        lambda: registry.set_alias(TENANT, "cats", name, 1),
        lambda: registry.remove_alias(TENANT, name, "prod"),
    ):
        with pytest.raises(InvalidArgument, match="is invalid"):
            call()


def test_a_page_token_holding_a_non_name_is_invalid_argument(registry: HeadRegistry) -> None:
    token = encode_token("cats\x00")
    with pytest.raises(InvalidArgument, match="page_token"):
        registry.list(TENANT, page_token=token)
