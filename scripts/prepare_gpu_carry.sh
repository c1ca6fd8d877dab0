#!/usr/bin/env bash
# Fill the folder that scripts/gpu_check.sh installs from on an offline GPU machine:
#   <out>/megablocks/  the wheels and BUILD_INFO.json made by scripts/build_gpu_wheels.sh
#   <out>/deps/        wheels of this project's dependencies that the GPU machine is not
#                      assumed to have (all but torch, lightning, torchmetrics, tensorboard,
#                      triton), with their own dependencies, plus pytest and setuptools
#                      (the build backend of the editable install), for the target Python.
# Run it on any x86-64 or other machine with pip and a package index; nothing is installed.
#
#   scripts/prepare_gpu_carry.sh --wheels ~/.cache/lightning-moe/gpu-wheels/dist/torch2.11.0-cuda13.0.2-cp312-sm90
#   scripts/prepare_gpu_carry.sh --no-datasets        # datasets + pyarrow + pandas are ~60 MB and
#                                                     # only Hugging Face sources import them
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=gpu-carry
WHEELS=""
PY_VERSION=3.12
WITH_DATASETS=1
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --python-version) PY_VERSION="$2"; shift 2 ;;
        --no-datasets) WITH_DATASETS=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT/deps" "$OUT/megablocks"
if [[ -n "$WHEELS" ]]; then
    [[ -f "$WHEELS/BUILD_INFO.json" ]] || { echo "error: $WHEELS has no BUILD_INFO.json (not from build_gpu_wheels.sh)" >&2; exit 2; }
    rm -f "$OUT"/megablocks/*
    cp "$WHEELS"/*.whl "$WHEELS/BUILD_INFO.json" "$OUT/megablocks/"
fi

# The same requirement list gpu_check.py installs, read from pyproject.toml.
mapfile -t REQUIREMENTS < <("$PYTHON" - "$WITH_DATASETS" <<'EOF'
import sys
sys.path.insert(0, "scripts")
from gpu_check import carried_requirements, requirement_name

for requirement in carried_requirements():
    if sys.argv[1] == "1" or requirement_name(requirement) != "datasets":
        print(requirement)
print("setuptools>=68")
EOF
)
ABI="cp${PY_VERSION/./}"
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64 linux_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
echo "downloading for CPython $PY_VERSION x86-64: ${REQUIREMENTS[*]}"
"$PYTHON" -m pip download --disable-pip-version-check --only-binary :all: --python-version "$PY_VERSION" \
    --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$OUT/deps" "${REQUIREMENTS[@]}"
# Drop what the GPU machine has already as a dependency of torch, lightning, torchmetrics,
# tensorboard or triton (numpy, pillow, PyYAML, ...), read from this machine's installed
# metadata when it has those packages; setuptools stays (pip's isolated build needs it).
"$PYTHON" - "$OUT/deps" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from gpu_check import PRESENT, installed_closure, wheel_project

present = installed_closure(PRESENT[:-1])  # triton: none of these need it on a CPU machine
if present is None:
    print(f"note: {', '.join(PRESENT)} are not all installed here, so nothing is pruned from the carry")
    sys.exit()
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    if wheel_project(wheel) in present - {"setuptools"}:
        print(f"pruned (a dependency of {', '.join(PRESENT)}): {wheel.name}")
        wheel.unlink()
EOF
du -sh "$OUT/deps" "$OUT/megablocks"
echo "carry $OUT to the GPU machine (into this checkout), then: scripts/gpu_check.sh --carry $OUT --out <dir>"
