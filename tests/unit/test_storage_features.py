"""Each tenant's feature cache: never another's, bounded by its quota, collected with its datasets; a corrupt
entry is recomputed, and progress is the same whatever was cached."""

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.config import Settings
from service.engine.backbones import Backbone
from service.engine.extraction import FeatureExtractor
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.datasets import DatasetStore
from service.store.db import Database
from service.store.features import FeatureCache, tenant_dir


def image_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    settings = Settings(data_dir=tmp_path)
    db = Database(settings.resolved_registry_url)
    return DatasetStore(db, BlobStore(settings.blob_dir), settings, Quotas(settings))


def cache_on(store: DatasetStore, cache_dir: Path, quota_bytes: int = 10**9, grace_s: float = 3600.0) -> FeatureCache:
    return FeatureCache(cache_dir, store.db, quota_bytes=quota_bytes, grace_s=grace_s)


def extractor_on(store: DatasetStore, cache_dir: Path, batch_size: int = 2, **cache: float) -> FeatureExtractor:
    return FeatureExtractor(store.blobs, cache_on(store, cache_dir, **cache), batch_size=batch_size, max_pixels=10**6)  # type: ignore[arg-type]


def upload(store: DatasetStore, tenant: str, seeds: list[int]) -> list[str]:
    info = store.create_from_labelled(
        tenant, "set", [(f"{s}.png", image_bytes(s)) for s in seeds], ["ab"[i % 2] for i in range(len(seeds))]
    )
    return [sha for sha, _ in store.examples(tenant, info.id)]


@pytest.mark.parametrize("damage", [b"torn", b"\x93NUMPY"], ids=["torn file", "header only"])
def test_a_corrupt_cache_entry_is_recomputed_not_a_failed_extraction(
    store: DatasetStore, mobilenet: Backbone, tmp_path: Path, damage: bytes
) -> None:
    shas = upload(store, "alice", [1, 2, 3])
    extractor = extractor_on(store, tmp_path / "cache")
    first = extractor.features(mobilenet, mobilenet.num_blocks, shas, tenant="alice")
    entry = next((tmp_path / "cache").rglob(f"{shas[1]}.npy"))
    entry.write_bytes(damage)

    again = extractor.features(mobilenet, mobilenet.num_blocks, shas, tenant="alice")

    torch.testing.assert_close(again, first)
    assert np.load(entry).dtype == np.float16  # written again


def test_a_cache_entry_of_the_wrong_type_is_recomputed(
    store: DatasetStore, mobilenet: Backbone, tmp_path: Path
) -> None:
    shas = upload(store, "alice", [1, 2])
    extractor = extractor_on(store, tmp_path / "cache")
    first = extractor.features(mobilenet, mobilenet.num_blocks, shas, tenant="alice")
    entry = next((tmp_path / "cache").rglob(f"{shas[0]}.npy"))
    np.save(entry, np.zeros(7, dtype=np.float64))  # not something put_many writes

    # Recomputed in a batch of one, not two: equal up to float rounding, which the cache's float16 can amplify to 1 ulp.
    recomputed = extractor.features(mobilenet, mobilenet.num_blocks, shas, tenant="alice")
    torch.testing.assert_close(recomputed, first, rtol=1e-3, atol=1e-3)


def test_progress_is_the_same_whether_or_not_the_cache_was_warm(
    store: DatasetStore, mobilenet: Backbone, tmp_path: Path
) -> None:
    upload(store, "bob", [1, 2, 3, 4])
    bobs = upload(store, "bob", [5, 2, 3, 6, 4])  # three images of his first dataset, two new ones
    warmed = extractor_on(store, tmp_path / "warm")
    warmed.features(mobilenet, mobilenet.num_blocks, bobs[1:3] + bobs[4:], tenant="bob")

    def progress_of(extractor: FeatureExtractor) -> list[tuple[int, int]]:
        calls: list[tuple[int, int]] = []

        def record(done: int, total: int) -> None:
            calls.append((done, total))

        extractor.features(mobilenet, mobilenet.num_blocks, bobs, tenant="bob", progress=record)
        return calls

    warm = progress_of(warmed)
    cold = progress_of(extractor_on(store, tmp_path / "cold"))

    assert warm == cold == [(2, 5), (4, 5), (5, 5)]


class CountingTrunk:
    """Counts the images the trunk runs on."""

    def __init__(self, backbone: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        real = backbone.features

        def counted(batch: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            self.images += len(batch)
            return real(batch, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(backbone, "features", counted)


def test_another_tenants_training_on_the_same_images_computes_its_own_features(
    store: DatasetStore, mobilenet: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alices = upload(store, "alice", [1, 2, 3])
    bobs = upload(store, "bob", [1, 2, 3])  # the same bytes
    extractor = extractor_on(store, tmp_path / "cache")
    trunk = CountingTrunk(mobilenet, monkeypatch)

    alice = extractor.features(mobilenet, mobilenet.num_blocks, alices, tenant="alice")
    assert trunk.images == 3
    bob = extractor.features(mobilenet, mobilenet.num_blocks, bobs, tenant="bob")
    assert trunk.images == 6  # Alice's cache did not spare Bob's trunk: his time tells him nothing
    extractor.features(mobilenet, mobilenet.num_blocks, bobs, tenant="bob")
    assert trunk.images == 6  # his own cache does
    torch.testing.assert_close(bob, alice)


def test_features_of_one_tenant_never_appear_under_another_tenants_folder(
    store: DatasetStore, mobilenet: Backbone, tmp_path: Path
) -> None:
    alices = upload(store, "alice", [1, 2])
    bobs = upload(store, "bob", [1, 2])
    extractor = extractor_on(store, tmp_path / "cache")
    extractor.features(mobilenet, mobilenet.num_blocks, alices, tenant="alice")
    alice_dir = tmp_path / "cache" / "tenants" / tenant_dir("alice")
    bob_dir = tmp_path / "cache" / "tenants" / tenant_dir("bob")

    assert sorted(p.stem for p in alice_dir.rglob("*.npy")) == sorted(alices)
    assert not bob_dir.exists()
    assert extractor.cache.get_many("bob", bobs, mobilenet.name, mobilenet.feature_key(mobilenet.num_blocks)) == {}
    extractor.features(mobilenet, mobilenet.num_blocks, bobs, tenant="bob")
    assert sorted(p.stem for p in bob_dir.rglob("*.npy")) == sorted(bobs)
    assert {p.parents[3] for p in (tmp_path / "cache").rglob("*.npy")} == {alice_dir, bob_dir}


def test_a_tenants_feature_bytes_count_against_its_quota_and_its_least_recently_used_are_evicted(
    store: DatasetStore, mobilenet: Backbone, tmp_path: Path
) -> None:
    shas = upload(store, "alice", [1, 2, 3, 4])
    bobs = upload(store, "bob", [5, 6])
    one_entry = 1280 * 2 + 128  # float16 pooled features and the .npy header
    extractor = extractor_on(store, tmp_path / "cache", quota_bytes=2 * one_entry)
    extractor.features(mobilenet, mobilenet.num_blocks, bobs, tenant="bob")
    extractor.features(mobilenet, mobilenet.num_blocks, shas[:2], tenant="alice")
    extractor.features(mobilenet, mobilenet.num_blocks, shas[:1], tenant="alice")  # used again: now the newest
    assert extractor.cache.bytes_used("alice") == 2 * one_entry

    # Over the quota the job still gets all its features; the cache keeps the newest within the quota.
    features = extractor.features(mobilenet, mobilenet.num_blocks, shas[2:], tenant="alice")
    assert features.shape == (2, 1280)
    assert extractor.cache.bytes_used("alice") <= 2 * one_entry
    kept = set(extractor.cache.get_many("alice", shas, mobilenet.name, mobilenet.feature_key(mobilenet.num_blocks)))
    assert kept == set(shas[2:])
    alice_files = (tmp_path / "cache" / "tenants" / tenant_dir("alice")).rglob("*.npy")
    assert {p.stem for p in alice_files} == kept  # evicted entries' files are gone too
    assert extractor.cache.bytes_used("bob") == 2 * one_entry  # another tenant's use never evicts Bob's


def test_deleting_a_dataset_removes_its_images_features_after_the_grace_period(
    store: DatasetStore, mobilenet: Backbone, tmp_path: Path
) -> None:
    kept = store.create_from_labelled(
        "alice", "kept", [("1.png", image_bytes(1)), ("2.png", image_bytes(2))], ["a", "b"]
    )
    dropped = store.create_from_labelled(
        "alice", "dropped", [("1.png", image_bytes(1)), ("3.png", image_bytes(3))], ["a", "b"]
    )
    bobs = upload(store, "bob", [3, 4])  # Bob's copy of the image only Alice's deleted dataset held
    shas = {sha for info in (kept, dropped) for sha, _ in store.examples("alice", info.id)}
    extractor = extractor_on(store, tmp_path / "cache", grace_s=3600.0)
    extractor.features(mobilenet, mobilenet.num_blocks, sorted(shas), tenant="alice")
    extractor.features(mobilenet, mobilenet.num_blocks, bobs, tenant="bob")
    only_dropped = shas - {sha for sha, _ in store.examples("alice", kept.id)}
    store.delete("alice", dropped.id)
    cache = extractor.cache

    assert cache.collect_garbage() == 0  # within the grace: a job may still be reading them
    assert (
        set(cache.get_many("alice", sorted(shas), mobilenet.name, mobilenet.feature_key(mobilenet.num_blocks))) == shas
    )

    collector = cache_on(store, tmp_path / "cache", grace_s=1e-6)
    time.sleep(0.01)
    assert collector.collect_garbage() == 1
    assert (
        set(cache.get_many("alice", sorted(shas), mobilenet.name, mobilenet.feature_key(mobilenet.num_blocks)))
        == shas - only_dropped
    )
    files = {p.stem for p in (tmp_path / "cache" / "tenants" / tenant_dir("alice")).rglob("*.npy")}
    assert files == shas - only_dropped
    assert set(cache.get_many("bob", bobs, mobilenet.name, mobilenet.feature_key(mobilenet.num_blocks))) == set(
        bobs
    )  # Bob still has his


def test_the_old_shared_cache_layout_is_collected(store: DatasetStore, tmp_path: Path) -> None:
    old = tmp_path / "cache" / "mobilenet_v2" / "pooled" / "ab" / f"{'ab' * 32}.npy"
    old.parent.mkdir(parents=True)
    np.save(old, np.zeros(4, dtype=np.float16))

    assert cache_on(store, tmp_path / "cache").collect_garbage() == 1
    assert not (tmp_path / "cache" / "mobilenet_v2").exists()
