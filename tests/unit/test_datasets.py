"""DatasetStore: uploads are validated completely, stored atomically and scoped to a tenant."""

import io
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from service.config import Settings
from service.errors import InvalidArgument, NotFound
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.datasets import DatasetStore
from service.store.db import Database, DatasetRow, ExampleRow
from service.store.pages import encode_token

TENANT = "acme"


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 8), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_zip(entries: dict[str, bytes | None]) -> bytes:
    """Entries map archive names to contents; None makes a directory entry."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            if data is None:
                archive.writestr(zipfile.ZipInfo(name), b"")  # a name ending in '/' is a directory
            else:
                archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        max_image_bytes=20_000,
        max_image_pixels=64 * 64,
        max_images_per_dataset=10,
        max_upload_bytes=60_000,
    )


@pytest.fixture
def db(settings: Settings) -> Database:
    return Database(settings.resolved_registry_url)


@pytest.fixture
def store(db: Database, settings: Settings) -> DatasetStore:
    return DatasetStore(db, BlobStore(settings.blob_dir), settings, Quotas(settings))


def good_files() -> tuple[list[tuple[str, bytes]], list[str]]:
    names = [("cat1.png", 1), ("dog1.jpg", 2), ("cat2.webp", 3), ("dog2.gif", 4)]
    fmts = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}
    uploads = [(name, image_bytes(fmts[name.rsplit(".", 1)[1]], seed=seed)) for name, seed in names]
    return uploads, ["cat", "dog", "cat", "dog"]


def assert_nothing_stored(store: DatasetStore, db: Database, settings: Settings) -> None:
    assert store.list(TENANT) == ([], None)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(DatasetRow)) == 0
        assert session.scalar(select(func.count()).select_from(ExampleRow)) == 0
    assert not [p for p in settings.blob_dir.rglob("*") if p.is_file()]


# -- creating ---------------------------------------------------------------------


def test_create_stores_examples_classes_and_counts(store: DatasetStore) -> None:
    uploads, labels = good_files()
    info = store.create_from_labelled(TENANT, "pets", uploads, labels)

    assert info.id.startswith("ds_") and info.tenant == TENANT and info.name == "pets"
    assert info.num_examples == 4
    assert info.classes == ["cat", "dog"]
    assert info.counts == {"cat": 2, "dog": 2}
    assert store.get(TENANT, info.id) == info
    examples = store.examples(TENANT, info.id)
    assert [label for _, label in examples] == labels
    assert [store.read_image(sha) for sha, _ in examples] == [data for _, data in uploads]


def test_duplicate_images_are_stored_once_but_counted_each_time(store: DatasetStore, settings: Settings) -> None:
    same = image_bytes(seed=7)
    info = store.create_from_labelled(
        TENANT, "dups", [("a.png", same), ("b.png", same), ("c.png", image_bytes(seed=8))], ["x", "x", "y"]
    )
    assert info.num_examples == 3 and info.counts == {"x": 2, "y": 1}
    assert len([p for p in settings.blob_dir.rglob("*") if p.is_file()]) == 2


def test_classes_are_sorted_alphabetically(store: DatasetStore) -> None:
    uploads = [(f"{i}.png", image_bytes(seed=i)) for i in range(3)]
    info = store.create_from_labelled(TENANT, "abc", uploads, ["zebra", "ant", "moose"])
    assert info.classes == ["ant", "moose", "zebra"]


# -- every bad upload: a clear error, and nothing stored ----------------------------


def truncated_jpeg() -> bytes:
    data = image_bytes("JPEG", size=(32, 32))
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    return image_bytes("PNG", size=(65, 65))  # 4225 pixels, over the 4096 limit


BAD_IMAGES = {
    "corrupt bytes": (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10, r"file 'bad\.png' is (not a decodable|a corrupt)"),
    "truncated jpeg": (truncated_jpeg(), r"file 'bad\.png' is a corrupt or truncated"),
    "text": (b"hello, I am a text file", r"file 'bad\.png' is not a decodable image"),
    "zero bytes": (b"", r"file 'bad\.png' is empty"),
    "decompression bomb": (bomb_png(), r"file 'bad\.png' has too many pixels"),
    "over max_image_bytes": (
        image_bytes("BMP", size=(90, 90)),
        r"file 'bad\.png' is .* over the limit of 20,000 bytes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_anywhere_stores_nothing(store: DatasetStore, db: Database, settings: Settings, case: str) -> None:
    data, message = BAD_IMAGES[case]
    uploads, labels = good_files()
    with pytest.raises(InvalidArgument, match=message):
        store.create_from_labelled(TENANT, "pets", [*uploads, ("bad.png", data)], [*labels, "cat"])
    assert_nothing_stored(store, db, settings)


@pytest.mark.parametrize(
    ("uploads", "labels", "message"),
    [
        ([(f"{i}.png", image_bytes(seed=i)) for i in range(11)], ["a", "b"] * 5 + ["a"], "more than 10 images"),
        (
            [(f"{i}.bmp", image_bytes("BMP", size=(64, 64), seed=i)) for i in range(6)],
            ["a", "b"] * 3,
            "exceeds the limit of 60,000 bytes",
        ),
        ([(f"{i}.png", image_bytes(seed=i)) for i in range(4)], ["a", "b", "a"], "3 labels for 4 files"),
        ([(f"{i}.png", image_bytes(seed=i)) for i in range(3)], ["cat", "cat", "cat"], r"only one class \('cat'\)"),
        ([], [], "no examples"),
        ([("a.png", image_bytes(seed=1)), ("b.png", image_bytes(seed=2))], ["a", " "], "file 'b.png' is empty"),
        ([("a.png", image_bytes(seed=1)), ("b.png", image_bytes(seed=2))], ["a", "b\x00"], "control characters"),
        ([("a.png", image_bytes(seed=1)), ("b.png", image_bytes(seed=2))], ["a", "b" * 129], "over the limit of 128"),
    ],
    ids=[
        "too many files",
        "upload over size limit",
        "labels do not match files",
        "single class",
        "empty",
        "blank label",
        "control character label",
        "long label",
    ],
)
def test_bad_uploads_are_refused_and_store_nothing(
    store: DatasetStore, db: Database, settings: Settings, uploads: list, labels: list[str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        store.create_from_labelled(TENANT, "pets", uploads, labels)
    assert_nothing_stored(store, db, settings)


def test_blank_dataset_name_is_refused(store: DatasetStore, db: Database, settings: Settings) -> None:
    uploads, labels = good_files()
    with pytest.raises(InvalidArgument, match="dataset name is empty"):
        store.create_from_labelled(TENANT, "  ", uploads, labels)
    assert_nothing_stored(store, db, settings)


def test_failed_commit_leaves_no_dataset_row(
    store: DatasetStore, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads, labels = good_files()

    def broken_commit(self: object) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr("sqlalchemy.orm.Session.commit", broken_commit)
    with pytest.raises(RuntimeError):
        store.create_from_labelled(TENANT, "pets", uploads, labels)
    monkeypatch.undo()
    assert store.list(TENANT) == ([], None)


# -- zip uploads --------------------------------------------------------------------


def test_zip_with_top_folder_and_mac_junk(store: DatasetStore) -> None:
    archive = make_zip(
        {
            "photos/": None,
            "photos/cat/": None,
            "photos/cat/1.png": image_bytes(seed=1),
            "photos/cat/2.jpg": image_bytes("JPEG", seed=2),
            "photos/dog/1.png": image_bytes(seed=3),
            "photos/.DS_Store": b"junk",
            "__MACOSX/photos/cat/._1.png": b"junk",
        }
    )
    info = store.create_from_zip(TENANT, "pets", archive)
    assert info.counts == {"cat": 2, "dog": 1}


def test_zip_from_a_path_without_top_folder(store: DatasetStore, tmp_path: Path) -> None:
    path = tmp_path / "upload.zip"
    path.write_bytes(make_zip({"cat/1.png": image_bytes(seed=1), "dog/1.png": image_bytes(seed=2)}))
    assert store.create_from_zip(TENANT, "pets", path).classes == ["cat", "dog"]


def symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat/1.png", image_bytes(seed=1))
        link = zipfile.ZipInfo("dog/1.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def two_classes(**extra: bytes | None) -> dict[str, bytes | None]:
    return {"cat/1.png": image_bytes(seed=1), "dog/1.png": image_bytes(seed=2), **extra}


BAD_ZIPS = {
    "not a zip": (b"this is not a zip archive", "not a readable zip archive"),
    "truncated zip": (make_zip(two_classes())[:200], "not a readable zip archive"),
    "parent path": (make_zip(two_classes(**{"cat/../../evil.png": image_bytes()})), "parent-relative path"),
    "absolute path": (make_zip(two_classes(**{"/etc/cat/x.png": image_bytes()})), "absolute"),
    "drive letter": (make_zip(two_classes(**{"C:/cat/x.png": image_bytes()})), "absolute"),
    "symlink": (symlink_zip(), "symbolic link"),
    "nested too deep": (make_zip(two_classes(**{"cat/sub/x.png": image_bytes()})), "nested deeper"),
    "class without examples": (make_zip(two_classes(**{"bird/": None})), "class 'bird' has no examples"),
    "too many entries": (
        make_zip({f"{c}/{i}.png": image_bytes(seed=i) for c in "ab" for i in range(6)}),
        "12 images, over the limit of 10",
    ),
    "bad image inside": (
        make_zip(two_classes(**{"dog/2.png": b"not an image"})),
        "file 'dog/2.png' is not a decodable image",
    ),
    "single class": (make_zip({"cat/1.png": image_bytes(seed=1), "cat/2.png": image_bytes(seed=2)}), "only one class"),
}


@pytest.mark.parametrize("case", list(BAD_ZIPS))
def test_bad_zips_are_refused_and_store_nothing(
    store: DatasetStore, db: Database, settings: Settings, case: str
) -> None:
    archive, message = BAD_ZIPS[case]
    with pytest.raises(InvalidArgument, match=message):
        store.create_from_zip(TENANT, "pets", archive)
    assert_nothing_stored(store, db, settings)


def test_zip_bomb_is_refused_from_declared_sizes_without_decompressing(
    store: DatasetStore, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_zip(two_classes(**{"cat/bomb.png": b"\0" * 1_000_000}))  # ~1 KB compressed
    assert len(archive) < 10_000

    def no_extraction(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an entry was decompressed")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_extraction)
    with pytest.raises(InvalidArgument, match="uncompressed, total .* over the upload limit of 60,000 bytes"):
        store.create_from_zip(TENANT, "pets", archive)
    monkeypatch.undo()
    assert_nothing_stored(store, db, settings)


def test_zip_archive_over_upload_limit_is_refused(store: DatasetStore, db: Database, settings: Settings) -> None:
    with pytest.raises(InvalidArgument, match="the zip archive total"):
        store.create_from_zip(TENANT, "pets", b"\0" * 60_001)
    assert_nothing_stored(store, db, settings)


# -- folder uploads -----------------------------------------------------------------


def write_tree(root: Path, entries: dict[str, bytes]) -> Path:
    for name, data in entries.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_folder_layout_is_read_and_dotfiles_skipped(store: DatasetStore, tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "up",
        {
            "cat/1.png": image_bytes(seed=1),
            "dog/1.png": image_bytes(seed=2),
            "dog/.hidden": b"junk",
            ".git/config": b"junk",
        },
    )
    info = store.create_from_folder(TENANT, "pets", root)
    assert info.counts == {"cat": 1, "dog": 1}


def test_folder_symlink_inside_root_is_followed(store: DatasetStore, tmp_path: Path) -> None:
    root = write_tree(tmp_path / "up", {"cat/1.png": image_bytes(seed=1), "dog/1.png": image_bytes(seed=2)})
    os.symlink(root / "cat" / "1.png", root / "dog" / "2.png")
    assert store.create_from_folder(TENANT, "pets", root).counts == {"cat": 1, "dog": 2}


@pytest.mark.parametrize("link", ["dog/2.png", "bird"])
def test_folder_symlink_outside_root_is_refused(
    store: DatasetStore, db: Database, settings: Settings, tmp_path: Path, link: str
) -> None:
    root = write_tree(tmp_path / "up", {"cat/1.png": image_bytes(seed=1), "dog/1.png": image_bytes(seed=2)})
    outside = write_tree(tmp_path / "outside", {"secret.png": image_bytes(seed=3)})
    os.symlink(outside / "secret.png" if link.endswith(".png") else outside, root / link)
    with pytest.raises(InvalidArgument, match="links outside the dataset folder"):
        store.create_from_folder(TENANT, "pets", root)
    assert_nothing_stored(store, db, settings)


def test_folder_with_empty_class_is_refused(
    store: DatasetStore, db: Database, settings: Settings, tmp_path: Path
) -> None:
    root = write_tree(tmp_path / "up", {"cat/1.png": image_bytes(seed=1), "dog/1.png": image_bytes(seed=2)})
    (root / "bird").mkdir()
    with pytest.raises(InvalidArgument, match="class 'bird' has no examples"):
        store.create_from_folder(TENANT, "pets", root)
    assert_nothing_stored(store, db, settings)


# -- reading, tenancy, paging, deleting --------------------------------------------------


def test_unknown_and_other_tenants_datasets_look_the_same(store: DatasetStore) -> None:
    uploads, labels = good_files()
    info = store.create_from_labelled(TENANT, "pets", uploads, labels)

    with pytest.raises(NotFound) as unknown:
        store.get(TENANT, "ds_doesnotexist")
    for call in (store.get, store.examples, store.delete):
        with pytest.raises(NotFound) as foreign:
            call("intruder", info.id)
        assert str(foreign.value) == str(unknown.value).replace("ds_doesnotexist", info.id)
    assert store.list("intruder") == ([], None)
    assert store.get(TENANT, info.id) == info  # the intruder's delete did nothing


def test_list_pages_walk_every_dataset_once(store: DatasetStore) -> None:
    uploads, labels = good_files()
    created = [store.create_from_labelled(TENANT, f"set{i}", uploads, labels).id for i in range(5)]
    store.create_from_labelled("other", "theirs", uploads, labels)

    seen, token, pages = [], None, 0
    while True:
        page, token = store.list(TENANT, page_size=2, page_token=token)
        seen += [info.id for info in page]
        pages += 1
        if token is None:
            break
    assert seen == created and pages == 3


FAR_FUTURE = encode_token("9999-12-31T23:59:59-05:00", "ds_1")  # overflows when converted to UTC


@pytest.mark.parametrize(
    "token", ["garbage!", "bm90IGpzb24", "WyJhIl0", "WyJub3QgYSBkYXRlIiwgImRzXzEiXQ", "WzEsIDJd", FAR_FUTURE]
)
def test_malformed_page_token_is_invalid_argument(store: DatasetStore, token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token .* is malformed"):
        store.list(TENANT, page_token=token)


@pytest.mark.parametrize("page_size", [0, 1001, -1])
def test_page_size_out_of_range_is_invalid_argument(store: DatasetStore, page_size: int) -> None:
    with pytest.raises(InvalidArgument, match="page_size must be between 1 and 1000"):
        store.list(TENANT, page_size=page_size)


def test_delete_removes_rows_and_unshared_images_only(store: DatasetStore, settings: Settings) -> None:
    shared = image_bytes(seed=100)
    first = store.create_from_labelled(TENANT, "a", [("s.png", shared), ("x.png", image_bytes(seed=101))], ["s", "x"])
    second = store.create_from_labelled(TENANT, "b", [("s.png", shared), ("y.png", image_bytes(seed=102))], ["s", "y"])
    first_shas = [sha for sha, _ in store.examples(TENANT, first.id)]

    store.delete(TENANT, first.id)

    with pytest.raises(NotFound):
        store.get(TENANT, first.id)
    assert store.read_image(first_shas[0]) == shared  # still used by the second dataset
    with pytest.raises(NotFound):
        store.read_image(first_shas[1])
    assert [d.id for d in store.list(TENANT)[0]] == [second.id]
