"""Where a dataset's images come from, read one at a time so a set never sits in memory whole.

A source is a list of ``Example``s that know their label, their size and how to
read their bytes: from a class-folder directory (``label/image.jpg``), a CSV of
``path,label`` (paths relative to the CSV), or in-memory images (bytes or PIL).
A zip is sent as it is (the server reads the class folders inside it).
"""

import csv
import io
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


@dataclass(frozen=True)
class Example:
    file_name: str
    label: str
    size: int | None  # bytes, when known before reading
    read: Callable[[], bytes]


def from_directory(root: Path) -> list[Example]:
    """``root/label/image.jpg``: one class per sub-folder; images directly in ``root`` are unlabelled (label "",
    a pool labelled later). Hidden files and non-images are skipped."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    examples = [
        Example(path.relative_to(root).as_posix(), "" if path.parent == root else path.parent.name, *_file(path))
        for path in sorted([*root.glob("*"), *root.glob("*/*")])
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    ]
    if not examples:
        raise ValueError(
            f"{root} has no images (expected {root}/<label>/<image>.jpg, or {root}/<image>.jpg unlabelled)"
        )
    return examples


def _file(path: Path) -> tuple[int, Callable[[], bytes]]:
    return path.stat().st_size, path.read_bytes


def from_csv(path: Path) -> list[Example]:
    """Rows of ``path,label`` (a header row ``path,label`` is allowed); relative paths start at the CSV's folder."""
    examples = []
    with path.open(newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or (number == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2 or not row[1].strip():
                raise ValueError(f"{path}:{number}: expected 'path,label', got {','.join(row)!r}")
            image = (path.parent / row[0].strip()).resolve()
            if not image.is_file():
                raise ValueError(f"{path}:{number}: {image} does not exist")
            # Named as the CSV names it, so the server's listings point back to the row's file.
            examples.append(Example(row[0].strip(), row[1].strip(), image.stat().st_size, image.read_bytes))
    if not examples:
        raise ValueError(f"{path} has no 'path,label' rows")
    return examples


def from_memory(images: Iterable[tuple[Any, str]]) -> Iterable[Example]:
    """(image, label) pairs, each image ``bytes`` or a PIL image (encoded as PNG when it is read)."""
    for index, (image, label) in enumerate(images):
        yield Example(
            f"image_{index:06d}.png", label, len(image) if isinstance(image, bytes) else None, image_reader(image)
        )


def image_reader(image: Any) -> Callable[[], bytes]:
    if isinstance(image, bytes | bytearray):
        return lambda: bytes(image)
    if hasattr(image, "save"):  # a PIL image: PIL is only needed by whoever made one

        def encode() -> bytes:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()

        return encode
    raise TypeError(f"an image must be bytes or a PIL image, not {type(image).__name__}")


def zip_image_count(path: Path) -> int:
    """Images in a class-folder zip, from its central directory (for progress)."""
    with zipfile.ZipFile(path) as archive:
        return sum(
            1
            for info in archive.infolist()
            if not info.is_dir() and Path(info.filename).suffix.lower() in IMAGE_SUFFIXES
        )
