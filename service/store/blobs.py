"""Content-addressed blob storage on a local directory, with atomic writes.

Dataset images are stored under their sha256, so identical uploads share one
file and a blob never changes once written. Head weights use plain named keys
(``heads/<uuid>.safetensors``) because the registry row, not
the content, decides which version is current.

Every write goes to a temp file in the target directory, is fsynced and then
renamed over the final name, so a crash leaves either the old file or the new
one, never a torn one. Directories the write creates are fsynced too (each one
and its parent), or a power cut could lose the new directory and the file in it.

Which dataset images may be deleted is decided by ``service.store.collector``;
this module only stores and removes files.
"""

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from service.errors import InvalidArgument, NotFound

log = logging.getLogger("graft")
# What a client reads when stored bytes are gone: the storage key stays in the log (it names the server's layout
# and other resources' ids, nothing the caller can act on).
_GONE = "stored data of this resource was not found (deleted meanwhile?); retry, or create the resource again"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEY_PART = re.compile(r"^[A-Za-z0-9_.-]+$")


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one.

    ``durable=False`` skips the fsyncs: still atomic for readers, but a power cut
    may lose the file. Right for caches, which can be recomputed.
    """
    created = _make_dirs(path.parent)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            if durable:
                tmp.flush()
                os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if durable:
        touched = {*created, *(d.parent for d in created), path.parent}
        for directory in sorted(touched, key=lambda d: len(d.parts), reverse=True):  # deepest first
            _fsync_dir(directory)


def _make_dirs(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return the ones this call found missing."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
    return missing


def _fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename, a new sub-directory) durable; a no-op where it cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BlobStore:
    """Blobs under ``root``: ``sha/ab/cd/<sha256>`` by content and ``named/<key>`` by name."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- content-addressed -------------------------------------------------

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its sha256.

        Always writes (and fsyncs), even when the same bytes are already stored: blobs are shared by every
        tenant, and an upload that skipped the write would be measurably faster, telling its tenant that
        someone had uploaded that image. Rewriting identical bytes is atomic and safe for concurrent readers.
        """
        sha = hashlib.sha256(data).hexdigest()
        atomic_write(self.path(sha), data)
        return sha

    def get(self, sha: str) -> bytes:
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            log.warning("blob %s not found", sha)
            raise NotFound(_GONE) from None

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def path(self, sha: str) -> Path:
        if not _SHA256.match(sha):
            raise InvalidArgument(f"'{sha}' is not a sha256 hex digest (64 lowercase hex characters)")
        return self.root / "sha" / sha[:2] / sha[2:4] / sha

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    def content_files(self) -> Iterator[Path]:
        """Files of the content-addressed tree: blobs (named by their sha256) and temp files of writes (``.*``)."""
        for path in (self.root / "sha").rglob("*"):
            if (path.name.startswith(".") or _SHA256.match(path.name)) and path.is_file():
                yield path

    # -- named --------------------------------------------------------------

    def put_named(self, key: str, data: bytes) -> None:
        atomic_write(self._named_path(key), data)

    def get_named(self, key: str) -> bytes:
        try:
            return self._named_path(key).read_bytes()
        except FileNotFoundError:
            log.warning("named blob %s not found", key)
            raise NotFound(_GONE) from None

    def delete_named(self, key: str) -> None:
        self._named_path(key).unlink(missing_ok=True)

    def _named_path(self, key: str) -> Path:
        """Map a key like ``heads/3f2a.safetensors`` to a path that stays under root."""
        parts = key.split("/")
        if any(part in (".", "..") or not _KEY_PART.match(part) for part in parts):
            raise InvalidArgument(
                f"blob key '{key}' is not allowed; use relative '/'-separated parts of letters, digits, "
                "'_', '-' and '.', without '..'"
            )
        return self.root / "named" / Path(*parts)
