"""Image validation and decoding for untrusted uploads.

Every image is checked before anything is stored: it must be non-empty, within
the byte limit, one of the allowed formats, within the pixel limit (checked from
the header, before any pixels are decoded, so a small file that claims to be
100000 x 100000 is refused cheaply) and it must decode completely, through the
same ``decode_rgb`` that training and prediction use, so an image accepted on
upload always decodes later and always to the same pixels.
"""

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps
from pydantic import BaseModel

from service.errors import InvalidArgument, reason

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# Modes with more than 8 bits per sample. Of the allowed formats only 16-bit PNG produces them (as I;16, or as
# I on older Pillow), so every one is read as 16-bit samples; convert("RGB") would clip them to white.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_SIXTEEN_TO_EIGHT = 257  # 65535 / 255: maps 0..65535 onto 0..255 exactly at both ends
_BAND_PIXELS = 1 << 20  # 16-bit samples are rescaled this many pixels at a time (a few MB), never whole


class ImageInfo(BaseModel):
    sha256: str
    format: str
    width: int
    height: int
    size_bytes: int


def inspect_image(data: bytes, *, name: str, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Validate one uploaded image fully; raise InvalidArgument naming ``name`` if it is unusable."""
    _check_size(data, name=name, max_bytes=max_bytes)
    image = _open_fully(data, name=name, max_pixels=max_pixels)
    _to_rgb(image, name=name)  # what training and prediction will do: refuse now what they could not decode
    return ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        format=image.format or "",
        width=image.width,
        height=image.height,
        size_bytes=len(data),
    )


def decode_rgb(data: bytes, *, max_pixels: int, max_bytes: int | None = None, name: str = "image") -> Image.Image:
    """Decode to an 8-bit RGB image (first frame of an animation, EXIF rotation applied).

    The one decoder for upload validation, training and prediction. Stored
    images were checked on upload; request images pass ``max_bytes`` so that
    they meet the same limits.
    """
    _check_size(data, name=name, max_bytes=max_bytes)
    return _to_rgb(_open_fully(data, name=name, max_pixels=max_pixels), name=name)


def _to_rgb(image: Image.Image, *, name: str) -> Image.Image:
    """Apply the EXIF orientation and map any mode to 8-bit RGB (16-bit samples scaled, alpha dropped)."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a malformed EXIF block raises SyntaxError, struct.error, ...
        raise InvalidArgument(
            f"file '{name}' has unreadable EXIF metadata ({reason(exc)}); re-export it without EXIF or with valid EXIF",
            file=name,
        ) from None
    try:
        if image.mode in _WIDE_MODES:
            return _sixteen_to_eight(image).convert("RGB")
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")  # palette transparency converts cleanly only via RGBA
        return image.convert("RGB")
    except Exception as exc:
        raise InvalidArgument(
            f"file '{name}' has pixel mode {image.mode!r}, which cannot be converted to RGB ({reason(exc)}); "
            "re-export it as 8-bit RGB",
            file=name,
        ) from None


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """A 16-bit grey image as 8-bit 'L': each sample rounded from x / 257 and clipped to 0..255.

    Done in bands of rows in integer arithmetic (``(x + 128) // 257`` is exactly ``round(x / 257)``: no sample
    lies halfway), so the only full-size array is the 1-byte-per-pixel result: a 5000 x 5000 PNG that once took
    600 MB of float64 intermediates now takes 25 MB beside Pillow's own decoded copy.
    """
    width, height = image.size
    grey = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        band = np.asarray(image.crop((0, top, width, bottom)))
        if band.dtype.kind == "f":  # mode F: float samples on the 16-bit scale
            band = np.rint(np.clip(band, 0, 65535)).astype(np.int64)
        grey[top:bottom] = (np.clip(band.astype(np.int64, copy=False), 0, 65535) + 128) // _SIXTEEN_TO_EIGHT
    return Image.fromarray(grey, "L")


def _check_size(data: bytes, *, name: str, max_bytes: int | None) -> None:
    if not data:
        raise InvalidArgument(f"file '{name}' is empty (0 bytes); send the image's contents", file=name)
    if max_bytes is not None and len(data) > max_bytes:
        # "at least": uploads are read with a bound of max_bytes + 1, so the true size may be larger
        raise InvalidArgument(
            f"file '{name}' is at least {len(data):,} bytes, over the limit of {max_bytes:,} bytes per image; "
            "shrink or re-encode it",
            file=name,
        )


def _open_fully(data: bytes, *, name: str, max_pixels: int) -> Image.Image:
    """Open ``data`` as an allowed format, check its size from the header, then decode it all."""
    allowed = ", ".join(ALLOWED_FORMATS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(name, max_pixels, str(exc)) from None
        except Image.UnidentifiedImageError:  # its text only names the in-memory file object, by heap address
            raise InvalidArgument(
                f"file '{name}' is not a decodable image in an allowed format ({allowed}); re-export it as one",
                file=name,
            ) from None
        except Exception as exc:  # PIL raises many types for hostile input
            raise InvalidArgument(
                f"file '{name}' is a corrupt or truncated image ({reason(exc)}); re-export it", file=name
            ) from None

        if image.width * image.height > max_pixels:
            raise _bomb(name, max_pixels, f"{image.width} x {image.height} pixels")
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated uploads would pass")
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(name, max_pixels, str(exc)) from None
        except Exception as exc:
            raise InvalidArgument(
                f"file '{name}' is a corrupt or truncated {image.format} image ({reason(exc)}); re-export it", file=name
            ) from None
    return image


def _bomb(name: str, max_pixels: int, detail: str) -> InvalidArgument:
    return InvalidArgument(
        f"file '{name}' has too many pixels ({detail}); the limit is {max_pixels:,} pixels, resize it",
        file=name,
    )


def image_content_type(data: bytes) -> str:
    """The media type of a stored image (validated at upload), from its header alone."""
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
        return f"image/{(image.format or 'octet-stream').lower()}"
