"""Build the graft Bento and check that it carries verified backbone weights.

    python scripts/build_bento.py      # what `make bento` runs; prints the Bento's tag and its weights

Steps: provision and verify the checkpoints, import them into the BentoML
model store, `bentoml build` from bentofile.yaml, then export the Bento to the
archive that `bentoml containerize` and `bentoml push` ship (BentoML 1.4 packs
referenced models only then) and check every pinned checkpoint inside that
archive against its sha256.
"""

import hashlib
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import bentoml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.engine.backbones import BACKBONES  # noqa: E402
from service.provision import BENTO_WEIGHTS_MODEL, import_into_bentoml, provision  # noqa: E402


def packed_weights(archive: Path) -> dict[str, str]:
    """file name -> sha256 of every checkpoint inside the exported Bento's weights model."""
    found = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and member.name.endswith(".pth") and BENTO_WEIGHTS_MODEL in parts and "models" in parts:
                found[Path(member.name).name] = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    return found


def main() -> int:
    import_into_bentoml(provision())
    bento = bentoml.bentos.build_bentofile(str(REPO / "bentofile.yaml"), build_ctx=str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        inside = packed_weights(Path(bento.export(str(Path(tmp) / "graft.bento"))))
    pins = {spec.weights.filename: spec.weights.sha256 for spec in BACKBONES.values() if spec.weights}
    wrong = {name: sha for name, sha in pins.items() if inside.get(name) != sha}
    print(json.dumps({"bento": str(bento.tag), "path": bento.path, "weights": inside, "verified": not wrong}))
    if wrong:
        print(f"error: the Bento lacks verified weights for {sorted(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
