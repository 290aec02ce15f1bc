"""`make bento` builds a Bento that carries the verified backbone weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_built_bento_contains_the_pinned_backbone_weights(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/build_bento.py"],
        cwd=REPO,
        env={**os.environ, "BENTOML_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["verified"]
    assert summary["weights"] == {
        "mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "efficientnet-lite2-9656183e.pth": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    }
    bento = Path(summary["path"])
    assert (bento / "src" / "service" / "app.py").exists()
    assert "graft-backbone-weights" in (bento / "bento.yaml").read_text()
