"""Cache of trunk features, keyed by (image sha256, backbone, split point).

Training reads features from here instead of re-running the backbone, so a
second job or a hyper-parameter search on the same images costs almost nothing.
Entries are float16 ``.npy`` files (half the disk of float32; ample precision
for training a head) at ``<root>/<backbone>/<split>/<sha[:2]>/<sha>.npy``.

The cache is disposable: writes are atomic but not fsynced, and an unreadable
entry (torn, corrupt, not float16) counts as a miss and is removed, to be
recomputed. So whether an entry is there is only known by reading it: there is
no "is it cached" check that could disagree with what a read returns.

The cache is shared by all tenants (one image, one entry), which is why
``FeatureExtractor`` reports progress in a way that does not depend on it.
"""

import io
import re
from pathlib import Path

import numpy as np
import torch

from service.errors import InvalidArgument
from service.store.blobs import atomic_write

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FeatureCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get_many(self, shas: list[str], backbone: str, split: str) -> dict[str, torch.Tensor]:
        """Cached features (float32, CPU) for the shas that have them; misses are left out."""
        found: dict[str, torch.Tensor] = {}
        for sha in shas:
            path = self._path(sha, backbone, split)
            try:
                array = np.load(path, allow_pickle=False)
            except FileNotFoundError:
                continue
            except (ValueError, OSError, EOFError):  # torn or corrupt entry: recompute it
                path.unlink(missing_ok=True)
                continue
            if array.dtype != np.float16:  # not written by put_many
                path.unlink(missing_ok=True)
                continue
            found[sha] = torch.from_numpy(array.astype(np.float32))
        return found

    def put_many(self, items: dict[str, torch.Tensor], backbone: str, split: str) -> None:
        for sha, tensor in items.items():
            buffer = io.BytesIO()
            np.save(buffer, tensor.detach().to("cpu", torch.float16).numpy(), allow_pickle=False)
            atomic_write(self._path(sha, backbone, split), buffer.getvalue(), durable=False)

    def _path(self, sha: str, backbone: str, split: str) -> Path:
        for what, value in (("backbone", backbone), ("split point", split)):
            if not _NAME.match(value):
                raise InvalidArgument(f"{what} '{value}' is not a valid cache key; use letters, digits, '_', '-', '.'")
        if not _SHA256.match(sha):
            raise InvalidArgument(f"'{sha}' is not a sha256 hex digest (64 lowercase hex characters)")
        return self.root / backbone / split / sha[:2] / f"{sha}.npy"
