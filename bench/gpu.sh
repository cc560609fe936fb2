#!/usr/bin/env bash
# The one-shot GPU benchmark: run it from anywhere on a machine with a CUDA GPU; prints JSON.
#   bench/gpu.sh                        # UNI2-h + DINOv3-L/16 (random weights of the exact architectures)
#   bench/gpu.sh --device cpu --small   # the same script on the test backbones (what CI runs)
# Uses .venv/bin/python when present (./justw makes it), else $PYTHON or python3 with this
# package installed (pip install -e .). Stops after 8 minutes whatever happens.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
cd "$root"
exec timeout 480 "$py" bench/gpu.py "$@"
