"""`python -m service.provision`: fetch and verify every pretrained backbone's weights.

Run once on a machine (``make weights``); the service then loads the verified
files from torch's cache without touching the network.
"""

import logging
import sys

from service.engine.backbones import BACKBONES
from service.engine.weights import WeightsUnavailable, ensure_weights


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for spec in BACKBONES.values():
        if spec.weights is None:
            continue
        try:
            path = ensure_weights(spec.weights)
        except WeightsUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{spec.name}: {path} (sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
