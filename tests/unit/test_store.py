"""Blob store, image validation, feature cache and the database wrapper."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

from service.errors import InvalidArgument, NotFound
from service.store.blobs import BlobStore, atomic_write
from service.store.db import Database, DatasetRow
from service.store.features import FeatureCache
from service.store.images import decode_rgb, inspect_image

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 10_000}


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's signature)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# -- blobs ------------------------------------------------------------------------


def test_put_is_content_addressed_sharded_and_idempotent(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    sha = blobs.put(b"hello")
    assert blobs.put(b"hello") == sha
    assert blobs.path(sha) == tmp_path / "sha" / sha[:2] / sha[2:4] / sha
    assert blobs.get(sha) == b"hello" and blobs.exists(sha)
    blobs.delete(sha)
    assert not blobs.exists(sha)


def test_get_of_missing_blob_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not found"):
        BlobStore(tmp_path).get("0" * 64)


def test_malformed_sha_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="sha256"):
        BlobStore(tmp_path).get("../../etc/passwd")


def test_named_blobs_round_trip_and_delete(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    blobs.put_named("heads/abc.safetensors", b"weights")
    assert blobs.get_named("heads/abc.safetensors") == b"weights"
    blobs.delete_named("heads/abc.safetensors")
    with pytest.raises(NotFound):
        blobs.get_named("heads/abc.safetensors")


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "heads/../../x", "a\\b", "", "heads/./x", "C:/x"])
def test_named_keys_that_could_escape_the_root_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(InvalidArgument, match="not allowed"):
        BlobStore(tmp_path / "blobs").put_named(key, b"x")
    assert not any((tmp_path).rglob("x"))


def test_atomic_write_replaces_whole_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.bin"
    atomic_write(target, b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file.bin"
    atomic_write(target, b"old")

    def broken_replace(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("service.store.blobs.os.replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


# -- images -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_allowed_formats_are_accepted(fmt: str) -> None:
    info = inspect_image(image_bytes(fmt), name="a.img", **LIMITS)
    assert (info.format, info.width, info.height) == (fmt, 8, 6)
    assert len(info.sha256) == 64 and info.size_bytes > 0


def test_zero_bytes_is_refused_naming_the_file() -> None:
    with pytest.raises(InvalidArgument, match="file 'cats/0.jpg' is empty"):
        inspect_image(b"", name="cats/0.jpg", **LIMITS)


def test_text_is_not_an_image() -> None:
    with pytest.raises(InvalidArgument, match="file 'notes.txt' is not a decodable image"):
        inspect_image(b"just some text, not pixels", name="notes.txt", **LIMITS)


def test_corrupt_bytes_are_refused() -> None:
    data = bytearray(image_bytes("PNG", size=(40, 40)))
    data[40:60] = b"\xff" * 20  # inside the compressed pixel data
    with pytest.raises(InvalidArgument, match="file 'bad.png'"):
        inspect_image(bytes(data), name="bad.png", **LIMITS)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97])  # cut in the header, mid-scan, near the end
def test_truncated_jpeg_is_refused(keep: float) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    data = buffer.getvalue()
    with pytest.raises(InvalidArgument, match="file 'cut.jpg' is a corrupt or truncated"):
        inspect_image(data[: int(len(data) * keep)], name="cut.jpg", **LIMITS)


def test_unsupported_format_is_refused() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="TIFF")
    with pytest.raises(InvalidArgument, match="allowed format"):
        inspect_image(buffer.getvalue(), name="scan.tiff", **LIMITS)


def test_image_over_byte_limit_is_refused() -> None:
    data = image_bytes("BMP", size=(50, 50))
    with pytest.raises(InvalidArgument, match="over the limit of 100 bytes per image"):
        inspect_image(data, name="big.bmp", max_bytes=100, max_pixels=10_000)


def test_pixel_count_over_limit_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidArgument, match="too many pixels .*5000 x 5000"):
        inspect_image(png_header_claiming(5000, 5000), name="bomb.png", **LIMITS)


def test_pil_decompression_bomb_error_becomes_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="file 'bomb.png' has too many pixels"):
        inspect_image(png_header_claiming(100_000, 100_000), name="bomb.png", max_bytes=1000, max_pixels=10**12)


def test_decode_rgb_returns_rgb_first_frame_of_gif() -> None:
    frames = [Image.new("P", (5, 4), i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = decode_rgb(buffer.getvalue(), max_pixels=100)
    assert image.mode == "RGB" and image.size == (5, 4)


def test_decode_rgb_refuses_bad_input() -> None:
    with pytest.raises(InvalidArgument, match="too many pixels"):
        decode_rgb(image_bytes("PNG", size=(20, 20)), max_pixels=100)
    with pytest.raises(InvalidArgument, match="not a decodable image"):
        decode_rgb(b"nope", max_pixels=100)


# -- feature cache ---------------------------------------------------------------


def feature_cache(tmp_path: Path) -> FeatureCache:
    db = Database(f"sqlite:///{tmp_path / 'registry.db'}")
    return FeatureCache(tmp_path / "features", db, quota_bytes=10**9, grace_s=3600.0)


def test_feature_cache_round_trip_leaves_misses_out(tmp_path: Path) -> None:
    cache = feature_cache(tmp_path)
    shas = [f"{i:064x}" for i in range(3)]
    features = {shas[0]: torch.randn(1280), shas[1]: torch.randn(16, 7, 7)}
    assert cache.get_many("acme", shas, "mobilenet_v2", "pooled") == {}

    cache.put_many("acme", features, "mobilenet_v2", "pooled")

    assert cache.get_many("acme", shas, "mobilenet_v2", "block15") == {}  # split point is part of the key
    got = cache.get_many("acme", shas, "mobilenet_v2", "pooled")
    assert set(got) == set(shas[:2])
    for sha, tensor in got.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert tensor.shape == features[sha].shape
        torch.testing.assert_close(tensor, features[sha].half().float())


def test_feature_cache_stores_float16(tmp_path: Path) -> None:
    cache = feature_cache(tmp_path)
    sha = "a" * 64
    cache.put_many("acme", {sha: torch.ones(4, dtype=torch.float64)}, "resnet50", "pooled")
    (path,) = (tmp_path / "features").rglob("*.npy")
    assert np.load(path).dtype == np.float16


def test_feature_cache_corrupt_entry_is_a_miss(tmp_path: Path) -> None:
    cache = feature_cache(tmp_path)
    sha = "b" * 64
    cache.put_many("acme", {sha: torch.ones(4)}, "resnet50", "pooled")
    (path,) = (tmp_path / "features").rglob("*.npy")
    path.write_bytes(b"torn")
    assert cache.get_many("acme", [sha], "resnet50", "pooled") == {}
    assert not path.exists()  # removed, to be recomputed


def test_feature_cache_refuses_keys_that_escape_its_root(tmp_path: Path) -> None:
    cache = feature_cache(tmp_path)
    with pytest.raises(InvalidArgument, match="backbone"):
        cache.get_many("acme", ["c" * 64], "..", "pooled")
    with pytest.raises(InvalidArgument, match="sha256"):
        cache.get_many("acme", ["../x"], "resnet50", "pooled")


# -- database -------------------------------------------------------------------


def test_session_rolls_back_on_error(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(RuntimeError):
        with db.session() as session:
            session.add(DatasetRow(id="ds_1", tenant="t", name="n", num_examples=0, classes=[]))
            session.flush()
            raise RuntimeError("boom")
    with db.session() as session:
        assert session.scalars(select(DatasetRow)).all() == []


def test_sqlite_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
