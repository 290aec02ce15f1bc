"""Build graft's OCI image from the package registries alone: ``make image``.

    python scripts/build_image.py                 # prints {"image": "graft:0.1.0", "bytes": ..., "built": ...}
    python scripts/build_image.py --context-only  # prepares the build context for `docker build` and prints its path

1. A Debian 12 root file system with Python 3.11, made by ``mmdebstrap`` from Debian's packages and imported
   into podman as ``localhost/graft-base:<recipe hash>`` (no image registry is involved).
2. A build context under ``.cache/image/context``: ``requirements.lock``, a wheelhouse holding exactly the
   locked wheels (``pip download`` from the configured indexes) and graft's own wheel, and the backbone
   checkpoints, each verified against its pinned sha256 (``service.provision``).
3. ``podman build`` of ``deploy/Containerfile`` on that base, tagged ``graft:<version>`` and ``graft:latest``.

The image carries a label with the hash of everything it was built from (the lock, the Containerfile, graft's
source, the weights' pins, the base recipe); when an image with that label exists, nothing is built again.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.engine.backbones import BACKBONES  # noqa: E402
from service.provision import provision  # noqa: E402

CONTAINERFILE = REPO / "deploy" / "Containerfile"
LOCK = REPO / "requirements.lock"
PODMAN_CONF = REPO / "deploy" / "podman" / "containers.conf"
CACHE = REPO / ".cache" / "image"
BASE_RECIPE = ["--variant=apt", "--include=python3,python3-venv,ca-certificates", "bookworm"]
SOURCE_DIRS = ("service", "adapters", "protos")
INPUTS_LABEL = "org.graft.inputs"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"graft:{VERSION}"


def podman_env() -> dict[str, str]:
    """The environment podman runs in: the project's containers.conf unless the caller names another."""
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(PODMAN_CONF))}


def podman(*args: str, capture: bool = True) -> str:
    """Run podman; its output is returned, or (``capture=False``) shown on stderr beside this script's progress."""
    result = subprocess.run(
        ["podman", *args], env=podman_env(), check=True, text=True, stdout=subprocess.PIPE if capture else sys.stderr
    )
    return (result.stdout or "").strip()


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def source_files() -> list[Path]:
    files = [REPO / "pyproject.toml", CONTAINERFILE, LOCK]  # not README.md: the wheel's description, not graft
    for folder in SOURCE_DIRS:
        files += sorted(p for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def inputs_hash() -> str:
    """What the image is made of: the base recipe, graft's source and lock, and the weights' pins."""
    pins = sorted(f"{spec.weights.filename}={spec.weights.sha256}" for spec in BACKBONES.values() if spec.weights)
    parts = [json.dumps(BASE_RECIPE).encode(), "\n".join(pins).encode()]
    parts += [str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() for path in source_files()]
    return digest(*parts)


def existing_image(inputs: str) -> str | None:
    ids = podman("images", "--quiet", "--filter", f"label={INPUTS_LABEL}={inputs}", "--filter", f"reference={IMAGE}")
    return ids.split()[0] if ids else None


def base_image() -> str:
    """The Debian base, imported once per recipe (mmdebstrap takes about 30 s)."""
    name = f"localhost/graft-base:{digest(json.dumps(BASE_RECIPE).encode())}"
    if subprocess.run(["podman", "image", "exists", name], env=podman_env()).returncode == 0:
        return name
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "rootfs.tar"
    log(f"making the Debian base with mmdebstrap {' '.join(BASE_RECIPE)}")
    subprocess.run(["mmdebstrap", "--quiet", *BASE_RECIPE, str(rootfs)], check=True)
    podman("import", "--quiet", str(rootfs), name)
    rootfs.unlink()
    return name


def build_context() -> Path:
    """requirements.lock, exactly its wheels plus graft's own, and the verified checkpoints."""
    context = CACHE / "context"
    wheels, weights = context / "wheels", context / "weights"
    wheels.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(weights, ignore_errors=True)
    weights.mkdir()
    log("collecting the locked wheels")
    pip = [sys.executable, "-m", "pip", "--quiet"]
    subprocess.run(
        [*pip, "download", "--no-deps", "--only-binary=:all:", "-r", str(LOCK), "-d", str(wheels)], check=True
    )
    for old in wheels.glob("graft-*.whl"):
        old.unlink()
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True)
    shutil.copyfile(LOCK, context / "requirements.lock")
    for path in provision():  # sha256-verified
        shutil.copyfile(path, weights / path.name)
    return context


def build() -> dict[str, object]:
    inputs = inputs_hash()
    started = time.monotonic()
    image_id = existing_image(inputs)
    built = image_id is None
    if built:
        base = base_image()
        context = build_context()
        log(f"podman build {IMAGE} from {base}")
        podman(
            "build",
            "--format",
            "docker",
            "--no-cache",
            "--file",
            str(CONTAINERFILE),
            "--build-arg",
            f"BASE={base}",
            "--label",
            f"{INPUTS_LABEL}={inputs}",
            "--tag",
            IMAGE,
            "--tag",
            "graft:latest",
            str(context),
            capture=False,
        )
        image_id = existing_image(inputs)
        assert image_id, f"podman build finished but no {IMAGE} carries {INPUTS_LABEL}={inputs}"
        podman("image", "prune", "--force", "--filter", f"label={INPUTS_LABEL}")  # the builds this one replaced
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image_id))
    return {
        "image": IMAGE,
        "id": image_id[:12],
        "bytes": size,
        "inputs": inputs,
        "built": built,
        "seconds": round(time.monotonic() - started, 1),
    }


def log(message: str) -> None:
    print(f"build_image: {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--context-only",
        action="store_true",
        help="only prepare the build context (for `docker build`) and print its folder",
    )
    if parser.parse_args().context_only:
        print(build_context())
        return 0
    print(json.dumps(build()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
