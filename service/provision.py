"""`python -m service.provision`: fetch and verify every pretrained backbone's weights.

Run once on a machine (``make weights``); the service then loads the verified
files from torch's cache without touching the network. With ``--trunks`` each
backbone's pooled trunk is also exported to ONNX into the trunk graph cache
(GRAFT_TRUNK_CACHE_DIR), so that a CPU server starts without exporting it
(the image is built so). With ``--bentoml`` the
verified files are also imported into the BentoML model store as
``graft-backbone-weights``, which ``bentoml build`` packs into the Bento so
that its container starts with no network (``make bento``).
"""

import argparse
import logging
import shutil
import sys
from pathlib import Path

from service.config import Settings
from service.engine.backbones import BACKBONES, Backbone, TrunkOptions
from service.engine.device import choose_placement
from service.engine.runtimes import Precision
from service.engine.weights import WeightsUnavailable, ensure_weights

BENTO_WEIGHTS_MODEL = "graft-backbone-weights"


def provision(*, allow_download: bool = True) -> list[Path]:
    """Every pinned checkpoint, verified; ``allow_download=False`` only checks what is already there."""
    pins = [spec.weights for spec in BACKBONES.values() if spec.weights is not None]
    return [ensure_weights(pin, allow_download=allow_download) for pin in pins]


def export_trunks() -> list[Path]:
    """Each pretrained backbone's pooled trunk as the CPU runtimes read it, in the trunk graph cache."""
    settings = Settings()
    placement = choose_placement("cpu")
    graphs = []
    for spec in BACKBONES.values():
        if spec.weights is not None:
            # One ONNX runtime is enough to export: no need to check and time every candidate here.
            options = TrunkOptions(runtime="onnxruntime", cache_dir=settings.trunk_cache_dir)
            backbone = Backbone(spec, placement, settings.weights_dir, options)
            graphs.append(backbone.graph(0, backbone.num_blocks).onnx(Precision.FP32))
    return graphs


def import_into_bentoml(paths: list[Path]) -> str:
    """Store the checkpoints as one BentoML model; returns its tag."""
    import bentoml

    with bentoml.models.create(
        BENTO_WEIGHTS_MODEL, labels={"project": "graft"}, metadata={path.name: "sha256-verified" for path in paths}
    ) as model:
        for path in paths:
            shutil.copyfile(path, Path(model.path) / path.name)
    return str(model.tag)


def bento_weights_dir() -> Path | None:
    """The packed checkpoints' folder when running from a Bento (or a local store that has them)."""
    import bentoml

    try:
        return Path(bentoml.models.get(f"{BENTO_WEIGHTS_MODEL}:latest").path)
    except bentoml.exceptions.NotFound:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bentoml", action="store_true", help="also import them into the BentoML model store")
    parser.add_argument("--offline", action="store_true", help="fetch nothing: fail unless every file is in place")
    parser.add_argument("--trunks", action="store_true", help="also export each pooled trunk to GRAFT_TRUNK_CACHE_DIR")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = provision(allow_download=not args.offline)
    except WeightsUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{path} (sha256 verified)")
    if args.trunks:
        for graph in export_trunks():
            print(f"{graph} (trunk graph)")
    if args.bentoml:
        print(f"imported into the BentoML model store as {import_into_bentoml(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
