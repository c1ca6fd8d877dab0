#!/usr/bin/env bash
# The GPU check of lightning-moe on a CUDA machine (offline is fine): installs the carried
# wheels, runs `pytest -m gpu`, a short quickstart fit with each backend and
# benchmarks/gpu_backends.py, and writes <out>/summary.json. `--dry-run` does the same on a
# CPU. PYTHON picks the interpreter (default: python, else python3). See scripts/gpu_check.py.
#
#   scripts/gpu_check.sh --carry gpu-carry --out "$OUT"
#   scripts/gpu_check.sh --dry-run --skip-install --out /tmp/gpu-check
set -euo pipefail
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
exec "$PYTHON" "$(dirname "$0")/gpu_check.py" "$@"
