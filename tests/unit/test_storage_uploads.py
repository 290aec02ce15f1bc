"""Uploads hold memory bounded by settings, never by what a client declares and pay quotas."""

import hashlib
import io
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from service.config import Settings
from service.errors import InvalidArgument, ResourceExhausted
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.datasets import DatasetStore
from service.store.db import Database, DatasetRow

TENANT = "acme"


def image_bytes(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def store_with(tmp_path: Path, **overrides: object) -> DatasetStore:
    settings = Settings(data_dir=tmp_path, **overrides)
    db = Database(settings.resolved_registry_url)
    return DatasetStore(db, BlobStore(settings.blob_dir), settings, Quotas(settings))


def stored_files(store: DatasetStore) -> list[Path]:
    return [p for p in store.blobs.root.rglob("*") if p.is_file()]


def dataset_count(store: DatasetStore) -> int:
    with store.db.session() as session:
        return session.scalar(select(func.count()).select_from(DatasetRow)) or 0


# -- classes ------------------------------------------------------------------------------------


def test_a_dataset_with_more_classes_than_the_limit_is_refused_at_the_first_class_over_it(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_classes=3)
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")
    consumed: list[int] = []

    def fifty_thousand_classes() -> Iterator[tuple[str, bytes, str]]:
        for i in range(50_000):
            consumed.append(i)
            yield f"{i}.png", tiny.getvalue(), f"class{i}"

    with pytest.raises(InvalidArgument, match=r"more than 3 classes .*GRAFT_MAX_CLASSES"):
        store.create(TENANT, "many", fifty_thousand_classes())
    assert len(consumed) == 4
    assert dataset_count(store) == 0 and stored_files(store) == []


def test_a_dataset_at_the_class_limit_is_accepted(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_classes=3)
    files = [(f"{i}.png", image_bytes(i)) for i in range(3)]
    info = store.create_from_labelled(TENANT, "three", files, ["a", "b", "c"])
    assert info.classes == ["a", "b", "c"]


# -- zip central directory ------------------------------------------------------------------------


def many_entries_zip(count: int) -> bytes:
    junk = {f"junk/.{i}": b"" for i in range(count)}  # hidden files: skipped, but entries all the same
    return make_zip({"cat/1.png": image_bytes(1), "dog/1.png": image_bytes(2)} | junk)


def no_directory_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise AssertionError("zipfile parsed the central directory")

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", refuse)


def test_zip_declaring_more_entries_than_the_bound_is_refused_before_zipfile_parses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_with(tmp_path, max_images_per_dataset=10)  # bound: 2 x 10 + 1,000 = 1,020 entries
    archive = many_entries_zip(1_100)
    no_directory_parsing(monkeypatch)
    with pytest.raises(InvalidArgument, match=r"declares 1,102 entries, over the limit of 1,020 .*GRAFT_MAX_IMAGES"):
        store.create_from_zip(TENANT, "junk", archive)
    assert dataset_count(store) == 0


def test_zip_whose_directory_holds_more_entries_than_it_declares_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_with(tmp_path, max_images_per_dataset=10)
    archive = bytearray(many_entries_zip(1_100))
    eocd = archive.rfind(b"PK\x05\x06")
    archive[eocd + 8 : eocd + 12] = struct.pack("<HH", 2, 2)  # claims 2 entries; zipfile would read all 1,102
    no_directory_parsing(monkeypatch)
    with pytest.raises(InvalidArgument, match="has more than 1,020 entries"):
        store.create_from_zip(TENANT, "junk", bytes(archive))


def zip64_claiming(entries: int, archive: bytes) -> bytes:
    """Rewrite ``archive``'s end record as ZIP64 (as writers do past 65,535 entries), declaring ``entries``."""
    eocd = archive.rfind(b"PK\x05\x06")
    _, _, _, _, _, size, offset, _ = struct.unpack_from("<4s4H2LH", archive, eocd)
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return archive[:eocd] + record + locator + end


def test_zip64_end_record_is_read_for_the_entry_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_with(tmp_path, max_images_per_dataset=10)
    honest = zip64_claiming(2, make_zip({"cat/1.png": image_bytes(1), "dog/1.png": image_bytes(2)}))
    assert store.create_from_zip(TENANT, "zip64", honest).counts == {"cat": 1, "dog": 1}

    no_directory_parsing(monkeypatch)
    with pytest.raises(InvalidArgument, match="declares 5,000,000 entries"):
        store.create_from_zip(TENANT, "bomb", zip64_claiming(5_000_000, many_entries_zip(0)))


# -- streaming: one image at a time ----------------------------------------------------------------


class ReadRecorder(io.BytesIO):
    """A file object that remembers the size of every read it served."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.served: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.served.append(len(data))
        return data


def test_zip_file_object_is_read_in_pieces_never_whole(tmp_path: Path) -> None:
    store = store_with(tmp_path)
    images = {f"{c}/{i}.png": image_bytes(i + (100 if c == "b" else 0), size=160) for c in "ab" for i in range(4)}
    archive = ReadRecorder(make_zip(images))
    size = len(archive.getvalue())

    info = store.create_from_zip(TENANT, "pieces", archive)

    assert info.counts == {"a": 4, "b": 4}
    largest_piece = max(65_557, *(len(data) for data in images.values()))  # the end record's search window, an image
    assert max(archive.served) <= largest_piece < size / 4
    assert not archive.closed  # the caller's file: the caller closes it


def test_labelled_file_objects_are_read_with_a_bound_of_one_image(tmp_path: Path) -> None:
    store = store_with(tmp_path, max_image_bytes=20_000)
    huge = ReadRecorder(b"\x89PNG" + b"\0" * 1_000_000)
    good = ReadRecorder(image_bytes(1))

    with pytest.raises(InvalidArgument, match=r"file 'huge.png' is at least 20,001 bytes, over the limit of 20,000"):
        store.create_from_labelled(TENANT, "big", [("good.png", good), ("huge.png", huge)], ["a", "b"])
    assert huge.served == [20_001]
    assert dataset_count(store) == 0 and stored_files(store) == []

    files = [("a.png", ReadRecorder(image_bytes(1))), ("b.png", image_bytes(2))]
    info = store.create_from_labelled(TENANT, "ok", files, ["a", "b"])
    assert info.counts == {"a": 1, "b": 1}


def test_images_are_stored_as_they_arrive_not_held_until_the_end(tmp_path: Path) -> None:
    store = store_with(tmp_path)
    on_disk_while_reading: list[int] = []

    def upload() -> Iterator[tuple[str, bytes, str]]:
        for i in range(3):
            on_disk_while_reading.append(len(stored_files(store)))
            yield f"{i}.png", image_bytes(i), "ab"[i % 2]

    store.create(TENANT, "streamed", upload())
    assert on_disk_while_reading == [0, 1, 2]


# -- stored bytes and quotas -------------------------------------------------------------------------


def test_stored_bytes_count_each_distinct_image_once(tmp_path: Path) -> None:
    store = store_with(tmp_path)
    a, b = image_bytes(1), image_bytes(2)
    info = store.create_from_labelled(TENANT, "dups", [("1.png", a), ("2.png", a), ("3.png", b)], ["x", "x", "y"])
    with store.db.session() as session:
        assert session.get(DatasetRow, info.id).stored_bytes == len(a) + len(b)


def test_an_upload_over_the_storage_quota_is_refused_and_stores_nothing_new(tmp_path: Path) -> None:
    shared, first_own, second_own = image_bytes(1), image_bytes(2), image_bytes(3)
    store = store_with(tmp_path, quota_stored_bytes=len(shared) + len(first_own) + len(second_own))
    first = store.create_from_labelled(TENANT, "first", [("s.png", shared), ("f.png", first_own)], ["s", "f"])

    with pytest.raises(ResourceExhausted, match="GRAFT_QUOTA_STORED_BYTES"):
        store.create_from_labelled(TENANT, "second", [("s.png", shared), ("o.png", second_own)], ["s", "o"])

    assert dataset_count(store) == 1
    assert not store.blobs.exists(hashlib.sha256(second_own).hexdigest())
    assert [store.read_image(sha) for sha, _ in store.examples(TENANT, first.id)] == [shared, first_own]
    store.create_from_labelled("other", "theirs", [("s.png", shared), ("o.png", second_own)], ["s", "o"])  # per tenant


def test_the_dataset_count_quota_is_enforced(tmp_path: Path) -> None:
    store = store_with(tmp_path, quota_datasets=1)
    files = [("a.png", image_bytes(1)), ("b.png", image_bytes(2))]
    store.create_from_labelled(TENANT, "one", files, ["a", "b"])
    with pytest.raises(ResourceExhausted, match="GRAFT_QUOTA_DATASETS"):
        store.create_from_labelled(TENANT, "two", files, ["a", "b"])
    assert dataset_count(store) == 1
