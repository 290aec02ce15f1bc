"""One decoder for upload, training and prediction: every pixel mode to the right 8-bit RGB."""

import io
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine.backbones import Backbone
from service.errors import InvalidArgument
from service.store.images import decode_rgb, inspect_image

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 1_000_000}


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def grey16_gradient() -> np.ndarray:
    """A 16-bit grey image using the whole range, with structure for the backbone to see."""
    y, x = np.mgrid[0:64, 0:64]
    return ((np.sin(x / 5.0) * np.cos(y / 7.0) + 1) / 2 * 65535).astype(np.uint16)


def test_a_16_bit_grey_png_decodes_to_its_8_bit_rescale_not_to_white() -> None:
    samples = grey16_gradient()
    data = encode(Image.fromarray(samples))
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    decoded = np.asarray(decode_rgb(data, max_pixels=LIMITS["max_pixels"]))

    expected = np.rint(samples / 257).astype(np.uint8)
    assert decoded.shape == (64, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], expected)


def test_a_16_bit_grey_pngs_embedding_matches_its_8_bit_rescales(mobilenet: Backbone) -> None:
    samples = grey16_gradient()
    sixteen = encode(Image.fromarray(samples))
    eight = encode(Image.fromarray(np.rint(samples / 257).astype(np.uint8)))  # its 8-bit rescale

    def embed(data: bytes) -> torch.Tensor:
        return mobilenet.features(mobilenet.preprocess(decode_rgb(data, max_pixels=LIMITS["max_pixels"]))[None])[0]

    a, b = embed(sixteen), embed(eight)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_a_large_16_bit_png_decodes_without_a_float64_copy_of_its_pixels() -> None:
    """16-bit samples are rescaled in bands, never through a full-size float64 copy: at most 8 bytes per pixel."""
    height, width = 1500, 2000
    samples = np.tile((np.arange(width, dtype=np.uint32) * 65535 // (width - 1)).astype(np.uint16), (height, 1))
    data = encode(Image.fromarray(samples))
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    tracemalloc.start()
    try:
        decoded = decode_rgb(data, max_pixels=height * width)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak <= 8 * height * width, f"{peak / (height * width):.1f} bytes per pixel"
    row = np.asarray(decoded)[0, :, 0].astype(int)
    assert np.abs(row - np.rint(samples[0] / 257)).max() <= 1  # the same pixels as the exact rescale


def test_a_16_bit_png_wider_than_one_band_decodes_row_by_row_to_the_same_pixels() -> None:
    samples = (np.arange(3 * 700_000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(3, 700_000)
    data = encode(Image.fromarray(samples))
    decoded = np.asarray(decode_rgb(data, max_pixels=samples.size))
    np.testing.assert_array_equal(decoded[..., 1], np.rint(samples / 257).astype(np.uint8))


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (4, 4), 100), "PNG", (100, 100, 100)),
        (Image.new("LA", (4, 4), (100, 50)), "PNG", (100, 100, 100)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "PNG", (10, 20, 30)),
        (palette_with_transparency(), "PNG", (200, 30, 30)),
        (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
        (Image.new("1", (4, 4), 1), "BMP", (255, 255, 255)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
        (Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)), "PNG", (128, 128, 128)),
    ],
    ids=["L", "LA", "RGBA", "P with transparency", "1 png", "1 bmp", "CMYK jpeg", "I;16 png"],
)
def test_every_mode_decodes_to_8_bit_rgb(image: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    data = encode(image, fmt)
    inspect_image(data, name="x", **LIMITS)  # accepted on upload
    decoded = decode_rgb(data, max_pixels=LIMITS["max_pixels"])
    assert decoded.mode == "RGB" and decoded.size == (4, 4)
    assert all(abs(got - want) <= 2 for got, want in zip(decoded.getpixel((1, 1)), expected, strict=True))


def broken_exif_png() -> bytes:
    return encode(Image.new("RGB", (8, 6), (10, 20, 30)), "PNG", exif=b"Exif\x00\x00garbage")


def test_a_broken_exif_block_is_a_clear_client_error_at_upload_and_at_decode() -> None:
    data = broken_exif_png()
    with pytest.raises(InvalidArgument, match=r"file 'rotated\.png' has unreadable EXIF metadata"):
        inspect_image(data, name="rotated.png", **LIMITS)
    with pytest.raises(InvalidArgument, match=r"file 'rotated\.png' has unreadable EXIF metadata"):
        decode_rgb(data, max_pixels=LIMITS["max_pixels"], name="rotated.png")


def test_exif_orientation_is_applied_identically_at_upload_and_decode() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (8, 6), (10, 20, 30)), "JPEG", exif=exif.tobytes())
    info = inspect_image(data, name="x.jpg", **LIMITS)
    assert (info.width, info.height) == (8, 6)  # the stored file, as uploaded
    assert decode_rgb(data, max_pixels=LIMITS["max_pixels"]).size == (6, 8)  # displayed upright
