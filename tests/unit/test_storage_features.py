"""The shared feature cache: a corrupt entry is recomputed, and progress does not reveal who warmed it."""

import io
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
from service.store.features import FeatureCache


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


def extractor_on(store: DatasetStore, cache_dir: Path, batch_size: int = 2) -> FeatureExtractor:
    return FeatureExtractor(store.blobs, FeatureCache(cache_dir), batch_size=batch_size, max_pixels=10**6)


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
    first = extractor.features(mobilenet, mobilenet.num_blocks, shas)
    entry = next((tmp_path / "cache").rglob(f"{shas[1]}.npy"))
    entry.write_bytes(damage)

    again = extractor.features(mobilenet, mobilenet.num_blocks, shas)

    torch.testing.assert_close(again, first)
    assert np.load(entry).dtype == np.float16  # written again


def test_a_cache_entry_of_the_wrong_type_is_recomputed(
    store: DatasetStore, mobilenet: Backbone, tmp_path: Path
) -> None:
    shas = upload(store, "alice", [1, 2])
    extractor = extractor_on(store, tmp_path / "cache")
    first = extractor.features(mobilenet, mobilenet.num_blocks, shas)
    entry = next((tmp_path / "cache").rglob(f"{shas[0]}.npy"))
    np.save(entry, np.zeros(7, dtype=np.float64))  # not something put_many writes

    # Recomputed in a batch of one, not two: equal up to float rounding, which the cache's float16 can amplify to 1 ulp.
    recomputed = extractor.features(mobilenet, mobilenet.num_blocks, shas)
    torch.testing.assert_close(recomputed, first, rtol=1e-3, atol=1e-3)


def test_progress_is_the_same_whether_or_not_another_tenant_warmed_the_cache(
    store: DatasetStore, mobilenet: Backbone, tmp_path: Path
) -> None:
    alices = upload(store, "alice", [1, 2, 3, 4])
    bobs = upload(store, "bob", [5, 2, 3, 6, 4])  # three of Alice's images, two of his own
    shared = extractor_on(store, tmp_path / "shared")
    shared.features(mobilenet, mobilenet.num_blocks, alices)  # Alice's job warms the shared cache

    def progress_of(extractor: FeatureExtractor) -> list[tuple[int, int]]:
        calls: list[tuple[int, int]] = []

        def record(done: int, total: int) -> None:
            calls.append((done, total))

        extractor.features(mobilenet, mobilenet.num_blocks, bobs, progress=record)
        return calls

    warm = progress_of(shared)
    cold = progress_of(extractor_on(store, tmp_path / "cold"))

    assert warm == cold == [(2, 5), (4, 5), (5, 5)]
