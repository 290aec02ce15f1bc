"""The checked-in gRPC code matches protos/ (regenerate with `python scripts/gen_protos.py`)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "service" / "grpc" / "gen"


def test_generated_grpc_code_is_up_to_date(tmp_path):
    subprocess.run([sys.executable, "scripts/gen_protos.py", str(tmp_path / "gen")], cwd=REPO, check=True)
    fresh = {p.relative_to(tmp_path / "gen"): p.read_text() for p in (tmp_path / "gen").rglob("*.py*")}
    current = {
        p.relative_to(CHECKED_IN): p.read_text() for p in CHECKED_IN.rglob("*.py*") if "__pycache__" not in p.parts
    }
    stale = sorted(str(path) for path in fresh.keys() | current.keys() if fresh.get(path) != current.get(path))
    assert not stale, f"stale generated files {stale}: run `python scripts/gen_protos.py`"
