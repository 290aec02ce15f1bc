#!/usr/bin/env bash
# The serving, latency and peer benchmarks on a CUDA device, printed as one JSON object.
#
# They run the code paths the service runs on CUDA (service/engine/device.py):
# the trunk in bf16 (fp16 where bf16 is unsupported) and channels_last, serving
# batches stacked in pinned host memory and copied asynchronously, no CPU
# micro-batching. Run from anywhere, after `make test` (the .venv and the data):
#
#     benchmarks/gpu.sh > gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export GRAFT_DEVICE=cuda

"$PY" - <<'CHECK' >&2
import sys

import torch

from service.engine.device import choose_placement

if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: torch sees no CUDA device; run it on a machine with an NVIDIA GPU and its driver")
print(torch.cuda.get_device_name(), choose_placement("cuda"))
CHECK

serving=$("$PY" benchmarks/serving.py | tail -n 1)
latency=$("$PY" benchmarks/latency.py | tail -n 1)
peers=$("$PY" benchmarks/peers.py --device cuda | tail -n 1)
printf '{"device": "%s", "serving": %s, "latency": %s, "peers": %s}\n' \
  "$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')" "$serving" "$latency" "$peers"
