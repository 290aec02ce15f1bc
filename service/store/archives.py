"""Read a class-folder dataset layout from a zip archive or a directory on disk.

The layout is ``<class>/<image>``, optionally inside one common top folder
(``photos/cats/1.jpg``); images at the root (or directly in the top folder)
are unlabelled, a pool labelled later. Structure and declared sizes are checked for the whole
upload before a single image is read, so a zip bomb or a path like
``../../etc/passwd`` is refused without decompressing anything. Even before
that, the number of entries is read from the end-of-central-directory record
and counted in the directory itself, so an archive of millions of tiny entries
is refused before ``zipfile`` builds an object for each. Images themselves are
validated later, one at a time, by ``DatasetStore.create``.
"""

import io
import os
import stat
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.config import Settings
from service.errors import InvalidArgument, reason

# (name for messages, image bytes, label or None: unlabelled): what DatasetStore.create consumes.
Example = tuple[str, bytes, str | None]

LAYOUT_HINT = (
    "lay images out as <class>/<image>, or <image> at the root for unlabelled ones (optionally inside one top folder)"
)


def examples_from_zip(zip_data: bytes | Path | BinaryIO, settings: Settings) -> Iterator[Example]:
    """Check the archive's structure and sizes now; return an iterator that reads images lazily.

    ``zip_data`` is the archive's bytes, its path, or a seekable file object
    (left open: its owner closes it).
    """
    if isinstance(zip_data, bytes):
        zip_data = io.BytesIO(zip_data)
    try:
        if isinstance(zip_data, Path):
            _check_total(zip_data.stat().st_size, settings, what="the zip archive")
            with open(zip_data, "rb") as file:
                _check_directory(file, settings)
        else:
            _check_total(zip_data.seek(0, os.SEEK_END), settings, what="the zip archive")
            _check_directory(zip_data, settings)
            zip_data.seek(0)
        archive = zipfile.ZipFile(zip_data)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise InvalidArgument(
            f"the upload is not a readable zip archive ({reason(exc)}); create it with 'zip -r'"
        ) from None
    try:
        files, dirs = _zip_entries(archive)
        labelled = _label_files(list(files), dirs)
        _check_count(len(labelled), settings)
        _check_total(sum(files[path].file_size for path, _ in labelled), settings, what="the images, uncompressed,")
    except BaseException:
        archive.close()
        raise
    return _read_zip(archive, [(files[path], label) for path, label in labelled], settings)


def examples_from_folder(root: Path, settings: Settings) -> Iterator[Example]:
    """Check the folder's structure and sizes now; return an iterator that reads images lazily."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgument(f"'{root}' is not a directory; pass the folder that holds one sub-folder per class")
    files, dirs = _folder_entries(root)
    labelled = _label_files(list(files), dirs)
    _check_count(len(labelled), settings)
    _check_total(sum(files[path] for path, _ in labelled), settings, what="the images")
    return _read_folder(root, labelled, settings)


# -- the central directory, before zipfile parses it ------------------------------

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ENTRY = struct.Struct("<4s4B4HL2L5H2L")  # central directory file header, without its variable parts
_MAX_COMMENT = 65535


def _entry_limit(settings: Settings) -> int:
    """Entries an archive may have: images plus room for folders and junk (``__MACOSX``, ``.DS_Store``)."""
    return 2 * settings.max_images_per_dataset + 1000


def _check_directory(file: BinaryIO, settings: Settings) -> None:
    """Refuse an archive whose directory declares, or holds, more entries than ``entry_limit``.

    zipfile reads the directory by its byte size, not its declared count, so
    the headers are counted too (reading 46 bytes each, skipping the rest).
    """
    declared, directory_start, directory_size = _directory(file)
    limit = _entry_limit(settings)
    if declared > limit:
        raise _too_many_entries(f"declares {declared:,} entries", limit)
    file.seek(directory_start)
    end = directory_start + directory_size
    count = 0
    while file.tell() + _ENTRY.size <= end:
        header = _ENTRY.unpack(file.read(_ENTRY.size))
        if header[0] != b"PK\x01\x02":
            raise zipfile.BadZipFile("bad central directory entry")
        count += 1
        if count > limit:
            raise _too_many_entries(f"has more than {limit:,} entries", limit)
        file.seek(header[12] + header[13] + header[14], os.SEEK_CUR)  # name, extra field, comment


def _directory(file: BinaryIO) -> tuple[int, int, int]:
    """(declared entries, start, size) of the central directory, located the way zipfile locates it."""
    size = file.seek(0, os.SEEK_END)
    tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
    file.seek(tail_start)
    tail = file.read()
    at = len(tail) - _EOCD.size  # the usual case: no archive comment
    if not (tail[at:].startswith(b"PK\x05\x06") and tail.endswith(b"\0\0")):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise zipfile.BadZipFile("no end of central directory record")
    eocd_at = tail_start + at
    _, _, _, _, entries, directory_size, _, _ = _EOCD.unpack_from(tail, at)
    directory_end = eocd_at
    locator_at = eocd_at - _ZIP64_LOCATOR.size
    if locator_at >= 0:
        file.seek(locator_at)
        locator = _ZIP64_LOCATOR.unpack(file.read(_ZIP64_LOCATOR.size))
        if locator[0] == b"PK\x06\x07":
            record_at = locator_at - _ZIP64_EOCD.size
            if record_at < 0:
                raise zipfile.BadZipFile("truncated ZIP64 end of central directory record")
            file.seek(record_at)
            record = _ZIP64_EOCD.unpack(file.read(_ZIP64_EOCD.size))
            if record[0] != b"PK\x06\x06":
                raise zipfile.BadZipFile("bad ZIP64 end of central directory record")
            entries, directory_size, directory_end = record[7], record[8], record_at
    directory_start = directory_end - directory_size
    if directory_start < 0:
        raise zipfile.BadZipFile("the central directory size is larger than the archive")
    return entries, directory_start, directory_size


def _too_many_entries(how_many: str, limit: int) -> InvalidArgument:
    return InvalidArgument(
        f"the zip archive {how_many}, over the limit of {limit:,} (2 x "
        "GRAFT_MAX_IMAGES_PER_DATASET + 1,000, leaving room for folders and junk files); split it into smaller "
        "datasets"
    )


# -- listing entries ---------------------------------------------------------


def _zip_entries(archive: zipfile.ZipFile) -> tuple[dict[str, zipfile.ZipInfo], list[str]]:
    """Files by normalised path, and directory paths; unsafe entries are refused, junk skipped."""
    files: dict[str, zipfile.ZipInfo] = {}
    dirs: list[str] = []
    for info in archive.infolist():
        path = _safe_relative(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InvalidArgument(f"zip entry '{info.filename}' is a symbolic link; archive the file itself")
        if _is_junk(path):
            continue
        if info.flag_bits & 0x1:
            raise InvalidArgument(f"zip entry '{info.filename}' is encrypted; archive it without a password")
        if info.is_dir():
            dirs.append(path)
        else:
            files[path] = info
    return files, dirs


def _folder_entries(root: Path) -> tuple[dict[str, int], list[str]]:
    """Files (relative posix path -> size) and directories under root; links must stay inside root."""
    real_root = root.resolve()
    files: dict[str, int] = {}
    dirs: list[str] = []
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real_dir = _inside(Path(dirpath), real_root, root)
        if real_dir in seen:  # a link back to a folder already walked
            dirnames.clear()
            continue
        seen.add(real_dir)
        relative_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = [d for d in dirnames if not _is_junk(d)]
        if relative_dir != ".":
            dirs.append(relative_dir)
        for filename in filenames:
            if _is_junk(filename):
                continue
            real_file = _inside(Path(dirpath) / filename, real_root, root)
            relative = (Path(dirpath) / filename).relative_to(root).as_posix()
            if not real_file.is_file():
                raise InvalidArgument(f"'{relative}' is not a regular file; datasets hold image files only")
            files[relative] = real_file.stat().st_size
    return files, dirs


def _inside(path: Path, real_root: Path, root: Path) -> Path:
    real = path.resolve()
    if not real.is_relative_to(real_root):
        raise InvalidArgument(
            f"'{path.relative_to(root)}' links outside the dataset folder; copy the file into the folder instead"
        )
    return real


def _safe_relative(name: str) -> str:
    """Normalise an archive member name, refusing anything that could escape the extraction root."""
    path = name.replace("\\", "/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or (len(path) >= 2 and path[1] == ":") or ".." in parts:
        raise InvalidArgument(
            f"zip entry '{name}' has an absolute or parent-relative path; use paths relative to the archive root"
        )
    return "/".join(parts)


def _is_junk(path: str) -> bool:
    """macOS resource forks and hidden files (``.DS_Store``) are not images."""
    return any(part == "__MACOSX" or part.startswith(".") for part in PurePosixPath(path).parts)


# -- layout --------------------------------------------------------------------


def _label_files(files: list[str], dirs: list[str]) -> list[tuple[str, str | None]]:
    """Pair each file with its class (its folder), or None for a file at the root (unlabelled); refuse deep
    nesting and empty classes."""
    top = _common_top_folder(files)
    labelled: list[tuple[str, str | None]] = []
    for path in sorted(files):
        parts = _strip_top(path, top)
        if len(parts) > 2:
            raise InvalidArgument(f"'{path}' is nested deeper than <class>/<image>; {LAYOUT_HINT}")
        labelled.append((path, parts[0] if len(parts) == 2 else None))

    classes = {label for _, label in labelled}
    for path in dirs:
        parts = _strip_top(path, top)
        if len(parts) == 1 and parts[0] not in classes:
            raise InvalidArgument(f"class '{parts[0]}' has no examples; add images to it or remove the folder")
        if len(parts) > 1:
            raise InvalidArgument(f"folder '{path}' is nested deeper than <class>/; {LAYOUT_HINT}")
    return labelled


def _common_top_folder(files: list[str]) -> str | None:
    """The one folder every file sits in, holding class folders (``top/class/image``, beside unlabelled
    ``top/image``), if there is one. Files all at depth 2 are class folders (``class/image``), not a top."""
    split = [path.split("/") for path in files]
    tops = {parts[0] for parts in split}
    depths = {len(parts) for parts in split}
    if len(tops) == 1 and 3 in depths and depths <= {2, 3}:
        return tops.pop()
    return None


def _strip_top(path: str, top: str | None) -> list[str]:
    parts = path.split("/")
    return parts[1:] if top is not None and parts[0] == top else parts


# -- limits and reading ----------------------------------------------------------


def _check_count(count: int, settings: Settings) -> None:
    if count > settings.max_images_per_dataset:
        raise InvalidArgument(
            f"the upload has {count:,} images, over the limit of {settings.max_images_per_dataset:,} "
            "per dataset; split it into smaller datasets"
        )


def _check_total(total: int, settings: Settings, *, what: str) -> None:
    if total > settings.max_upload_bytes:
        raise InvalidArgument(
            f"{what} total {total:,} bytes, over the upload limit of {settings.max_upload_bytes:,} bytes; "
            "split the upload into smaller datasets"
        )


def _read_zip(
    archive: zipfile.ZipFile, members: list[tuple[zipfile.ZipInfo, str | None]], settings: Settings
) -> Iterator[Example]:
    with archive:
        for info, label in members:
            try:
                with archive.open(info) as member:
                    data = member.read(settings.max_image_bytes + 1)  # never more than one image's limit
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
                raise InvalidArgument(f"zip entry '{info.filename}' cannot be extracted ({reason(exc)})") from None
            yield info.filename, data, label


def _read_folder(root: Path, labelled: list[tuple[str, str | None]], settings: Settings) -> Iterator[Example]:
    for path, label in labelled:
        with open(root / path, "rb") as file:
            yield path, file.read(settings.max_image_bytes + 1), label
