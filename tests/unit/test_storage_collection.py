"""Dataset images are collected by mark and sweep: a delete never takes an image another upload is storing."""

import hashlib
import io
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, update

from service.config import Settings
from service.engine.backbones import Backbone
from service.engine.extraction import FeatureExtractor
from service.errors import InvalidArgument
from service.quotas import Quotas
from service.store import blobs as blobs_module
from service.store.blobs import BlobStore, atomic_write
from service.store.datasets import DatasetStore
from service.store.db import BlobRow, Database, ExampleRow, utcnow
from service.store.features import FeatureCache


def image_bytes(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path: Path, registry_url: str) -> Settings:
    """On SQLite and on a real PostgreSQL: the protocol relies on each one's locking."""
    return Settings(data_dir=tmp_path, registry_url=registry_url)


@pytest.fixture
def db(settings: Settings) -> Database:
    return Database(settings.resolved_registry_url)


@pytest.fixture
def store(db: Database, settings: Settings) -> DatasetStore:
    return DatasetStore(db, BlobStore(settings.blob_dir), settings, Quotas(settings))


def sha_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# -- a sweep racing an upload of the same image -------------------------------------------------


class PausingBlobStore(BlobStore):
    """A real blob store that runs ``after_put`` once a given image is on disk: the race's window, held open."""

    def __init__(self, root: Path, pause_after: bytes) -> None:
        super().__init__(root)
        self.pause_after = pause_after
        self.after_put: Callable[[], None] = lambda: None

    def put(self, data: bytes) -> str:
        sha = super().put(data)
        if data == self.pause_after:
            self.after_put()
        return sha


def test_deleting_a_dataset_keeps_an_image_another_tenants_upload_has_stored_but_not_committed(
    db: Database, mobilenet: Backbone, settings: Settings
) -> None:
    shared, own_a, own_b = image_bytes(1), image_bytes(2), image_bytes(3)
    blobs = PausingBlobStore(settings.blob_dir, pause_after=shared)
    store = DatasetStore(db, blobs, settings, Quotas(settings))
    bobs = store.create_from_labelled("bob", "b", [("s.png", shared), ("b.png", own_b)], ["s", "b"])
    # Alice's copy of the shared image is on disk, her rows not yet committed: Bob deletes his dataset now.
    blobs.after_put = lambda: store.delete("bob", bobs.id)

    alices = store.create_from_labelled("alice", "a", [("s.png", shared), ("a.png", own_a)], ["s", "a"])

    examples = store.examples("alice", alices.id)
    assert alices.counts == {"a": 1, "s": 1}
    assert [store.read_image(sha) for sha, _ in examples] == [shared, own_a]
    cache = FeatureCache(settings.feature_dir, db, quota_bytes=10**9, grace_s=settings.blob_grace_s)
    extractor = FeatureExtractor(blobs, cache, batch_size=4, max_pixels=10**6)
    shas = [sha for sha, _ in examples]
    assert extractor.features(mobilenet, mobilenet.num_blocks, shas, tenant="alice").shape == (2, 1280)
    assert not blobs.exists(sha_of(own_b))  # what only Bob used is gone


def test_a_failed_upload_removes_its_own_images_but_not_one_another_upload_has_pinned(
    store: DatasetStore, settings: Settings
) -> None:
    shared, own = image_bytes(1), image_bytes(2)
    failed_midway: list[str] = []

    def bobs_upload() -> Iterator[tuple[str, bytes, str]]:
        yield "s.png", shared, "s"
        yield "b.png", own, "b"
        yield "bad.png", b"not an image", "b"

    def alices_upload() -> Iterator[tuple[str, bytes, str]]:
        yield "s.png", shared, "s"  # pinned and written, not committed...
        with pytest.raises(InvalidArgument):
            store.create("bob", "b", bobs_upload())  # ...while Bob's upload of the same image fails
        failed_midway.append("bob")
        yield "a.png", image_bytes(3), "a"

    alices = store.create("alice", "a", alices_upload())

    assert failed_midway == ["bob"]
    assert store.read_image(sha_of(shared)) == shared
    assert not store.blobs.exists(sha_of(own))
    assert store.get("alice", alices.id).num_examples == 2


def test_delete_collects_the_datasets_images_at_once(store: DatasetStore, db: Database) -> None:
    info = store.create_from_labelled("alice", "a", [("x.png", image_bytes(1)), ("y.png", image_bytes(2))], ["x", "y"])
    shas = [sha for sha, _ in store.examples("alice", info.id)]

    store.delete("alice", info.id)

    assert not any(store.blobs.exists(sha) for sha in shas)
    with db.session() as session:
        assert session.scalars(select(BlobRow)).all() == []


def test_an_upload_pins_images_only_while_it_runs(store: DatasetStore, db: Database) -> None:
    store.create_from_labelled("alice", "a", [("x.png", image_bytes(1)), ("y.png", image_bytes(2))], ["x", "y"])
    with db.session() as session:
        rows = session.scalars(select(BlobRow)).all()
    assert len(rows) == 2 and all(row.pinned_until is None for row in rows)


# -- the periodic sweep ---------------------------------------------------------------------------


def test_collect_garbage_removes_what_a_crash_left_after_the_grace(
    store: DatasetStore, db: Database, settings: Settings
) -> None:
    kept = store.create_from_labelled("alice", "a", [("x.png", image_bytes(1)), ("y.png", image_bytes(2))], ["x", "y"])
    blobs = store.blobs
    # A crash after the pin and the write, before the rows: a row with a pin, a file, no example.
    crashed = image_bytes(10)
    pin = store.collector.pin(sha_of(crashed), len(crashed))
    blobs.put(crashed)
    # Files with no row: from before pins existed, and the temp file of a write that died.
    legacy, young = image_bytes(11), image_bytes(12)
    legacy_sha, young_sha = blobs.put(legacy), blobs.put(young)
    age(blobs.path(legacy_sha), settings.blob_grace_s + 60)
    temp = blobs.path(legacy_sha).parent / f".{legacy_sha}.abc.tmp"
    temp.write_bytes(b"half")
    age(temp, settings.blob_grace_s + 60)

    assert store.collect_garbage() == 2  # the old row-less file and the stale temp file
    assert not blobs.exists(legacy_sha) and not temp.exists()
    assert blobs.exists(pin.sha) and blobs.exists(young_sha)  # the pin holds; the young file may be in flight

    with db.session() as session:  # the grace passes
        session.execute(update(BlobRow).values(pinned_until=utcnow() - timedelta(seconds=1)))
    assert store.collect_garbage() == 1

    assert not blobs.exists(pin.sha) and blobs.exists(young_sha)
    assert [store.read_image(sha) for sha, _ in store.examples("alice", kept.id)] == [image_bytes(1), image_bytes(2)]


def test_collect_garbage_keeps_old_files_that_examples_still_use(
    store: DatasetStore, db: Database, settings: Settings
) -> None:
    info = store.create_from_labelled("alice", "a", [("x.png", image_bytes(1)), ("y.png", image_bytes(2))], ["x", "y"])
    with db.session() as session:  # a dataset from before blob rows existed
        session.execute(BlobRow.__table__.delete())
    for sha, _ in store.examples("alice", info.id):
        age(store.blobs.path(sha), settings.blob_grace_s + 60)

    assert store.collect_garbage() == 0
    with db.session() as session:
        adopted = set(session.scalars(select(BlobRow.sha256)))
        used = set(session.scalars(select(ExampleRow.image_sha256)))
    assert adopted == used and all(store.blobs.exists(sha) for sha in used)


def test_a_pin_after_a_sweep_rewrites_the_file(store: DatasetStore, settings: Settings) -> None:
    data = image_bytes(5)
    sha = sha_of(data)
    store.create_from_labelled("bob", "b", [("x.png", data), ("y.png", image_bytes(6))], ["x", "y"])
    bob = store.list("bob")[0][0]
    store.delete("bob", bob.id)
    assert not store.blobs.exists(sha)

    info = store.create_from_labelled("alice", "a", [("x.png", data), ("y.png", image_bytes(7))], ["x", "y"])
    assert store.read_image(store.examples("alice", info.id)[0][0]) == data


# -- durable directories --------------------------------------------------------------------------


def test_atomic_write_fsyncs_every_directory_it_creates_and_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = blobs_module._fsync_dir
    monkeypatch.setattr(blobs_module, "_fsync_dir", lambda d: (synced.append(d), real(d)))
    (tmp_path / "root").mkdir()

    atomic_write(tmp_path / "root" / "ab" / "cd" / "file", b"x")

    assert set(synced) == {tmp_path / "root", tmp_path / "root" / "ab", tmp_path / "root" / "ab" / "cd"}
    synced.clear()
    atomic_write(tmp_path / "root" / "ab" / "cd" / "other", b"y")  # nothing new: only the file's directory
    assert synced == [tmp_path / "root" / "ab" / "cd"]


def test_uploading_an_image_another_tenant_already_stored_does_the_same_write(
    store: DatasetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dedup must not be observable: a second tenant's upload of the same bytes writes (and fsyncs) as the first."""
    writes: list[str] = []
    real = blobs_module.atomic_write

    def counted(path: Path, data: bytes, **kwargs: bool) -> None:
        writes.append(path.name)
        real(path, data, **kwargs)

    monkeypatch.setattr(blobs_module, "atomic_write", counted)
    files = [("s.png", image_bytes(1)), ("o.png", image_bytes(2))]
    alices = store.create_from_labelled("alice", "a", files, ["s", "o"])
    first = list(writes)
    bobs = store.create_from_labelled("bob", "a", files, ["s", "o"])

    assert writes == first + first  # the same writes, whether or not the bytes were there
    same = {"id", "created_at", "tenant"}
    assert alices.model_dump(exclude=same) == bobs.model_dump(exclude=same)
    with store.db.session() as session:  # and the same quota charge
        assert store.quotas.stored_bytes(session, "alice") == store.quotas.stored_bytes(session, "bob") > 0
