#!/usr/bin/env bash
# Build x86-64 Linux wheels of megablocks 0.10.0, stanford-stk 0.7.1 and grouped_gemm 0.3.0
# for one (torch, CUDA, Python, GPU architecture) target, on a machine WITHOUT a GPU.
#
# Everything comes from PyPI through pip: the CUDA build of torch, and the CUDA compiler,
# runtime and headers as NVIDIA's `cuda-toolkit` packages. No system CUDA, no driver.
# The wheels then install on an offline GPU machine with
#     pip install --no-index --no-deps <out>/*.whl
# (docs/megablocks.md, "Build the wheels once on any machine with pip, carry them").
# megablocks 0.10.0 needs a one-line patch to compile with CUDA 13 (see step 3 below).
#
#   scripts/build_gpu_wheels.sh                       # torch 2.11.0 (CUDA 13.0), Python 3.12, sm_90
#   scripts/build_gpu_wheels.sh --arch "8.0;9.0" --jobs 8 --work /tmp/gw
#   scripts/build_gpu_wheels.sh --help
#
# grouped_gemm is built on its default cuBLAS path (one cublasGemmEx per expert), not its
# CUTLASS grouped kernel (GROUPED_GEMM_CUTLASS=1): grouped_gemm 0.3.0's CUTLASS kernel is a
# CUTLASS 2.x GemmGrouped instantiated for cutlass::arch::Sm80 (Ampere mma.sync tiles), so on
# Hopper it cannot use wgmma/TMA, while cuBLAS picks its sm_90 kernels for each expert's
# GEMM. It also compiles three large template instantiations (slow on few cores). --cutlass
# builds the other variant, into its own folder (the wheels' names do not differ).
set -euo pipefail

TORCH_VERSION=2.11.0
CUDA_TOOLKIT_VERSION=13.0.2
PYTHON=python3.12
ARCH_LIST=9.0
CUTLASS=0
JOBS=2
WORK="${XDG_CACHE_HOME:-$HOME/.cache}/lightning-moe/gpu-wheels"
VENV=""
OUT=""
NICE=0

usage() {
    cat <<EOF
usage: $0 [options]
  --torch VERSION         torch to build against (default $TORCH_VERSION; the PyPI wheel's CUDA decides the toolkit)
  --cuda-toolkit VERSION  NVIDIA cuda-toolkit pip packages, same CUDA major.minor as torch (default $CUDA_TOOLKIT_VERSION)
  --python PYTHON         interpreter of the target Python version (default $PYTHON)
  --arch LIST             TORCH_CUDA_ARCH_LIST, e.g. "9.0" (H100/H200), "8.0;9.0" (default $ARCH_LIST)
  --cutlass               build grouped_gemm with GROUPED_GEMM_CUTLASS=1 (default: cuBLAS, see the header)
  --jobs N                parallel compile jobs, MAX_JOBS (default $JOBS; ~2-4 GB of memory each)
  --work DIR              build folder: venv, CUDA_HOME shim, source archives (default $WORK)
  --venv DIR              build environment (default DIR/venv-<target>; reused when it exists)
  --out DIR               where the wheels go (default DIR/dist/<target>)
  --nice                  run pip and the compilers under nice -n 19 (a shared machine)
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --torch) TORCH_VERSION="$2"; shift 2 ;;
        --cuda-toolkit) CUDA_TOOLKIT_VERSION="$2"; shift 2 ;;
        --python) PYTHON="$2"; shift 2 ;;
        --arch) ARCH_LIST="$2"; shift 2 ;;
        --cutlass) CUTLASS=1; shift ;;
        --jobs) JOBS="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --nice) NICE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ "$(uname -m)" != "x86_64" || "$(uname -s)" != "Linux" ]]; then
    echo "error: this script builds x86-64 Linux wheels and must run on x86-64 Linux" >&2
    exit 2
fi
"$PYTHON" -c 'import venv' 2>/dev/null || { echo "error: --python $PYTHON does not run (or has no venv module)" >&2; exit 2; }
command -v g++ >/dev/null || { echo "error: a C++ compiler (g++) is needed" >&2; exit 2; }

PY_TAG=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
ARCH_TAG="sm$(echo "$ARCH_LIST" | tr -d '.' | tr ';' '-' | tr -d ' ')"
TARGET="torch${TORCH_VERSION}-cuda${CUDA_TOOLKIT_VERSION}-${PY_TAG}-${ARCH_TAG}$([[ $CUTLASS == 1 ]] && echo -cutlass || true)"
VENV="${VENV:-$WORK/venv-torch${TORCH_VERSION}-cuda${CUDA_TOOLKIT_VERSION}-${PY_TAG}}"
OUT="${OUT:-$WORK/dist/$TARGET}"
CUDA_SHIM="$WORK/cuda-home-cuda${CUDA_TOOLKIT_VERSION}-${PY_TAG}"
SDIST="$WORK/sdist"
RUN=(); [[ $NICE == 1 ]] && RUN=(nice -n 19)

# The published source archives (PyPI), checked before anything is built from them.
declare -A SHA256=(
    [megablocks-0.10.0.tar.gz]=956fd9880fa869f7468da125da230733d5f84e10a9f8c2991e5e16523c6fe1e0
    [stanford_stk-0.7.1.tar.gz]=fc46140c2572ee9c008b2ac67ee6656f63f49c1074da8aea0923fa8290702871
    [grouped_gemm-0.3.0.tar.gz]=f0555da33a975610e9160f52449082c5e699525524581a0e5f990b14b02676a3
)
ORDER=(stanford_stk-0.7.1.tar.gz megablocks-0.10.0.tar.gz grouped_gemm-0.3.0.tar.gz)  # patched one first: fail early

log() { echo "[$(date -u +%H:%M:%S)] $*"; }
start_all=$(date +%s)
mkdir -p "$WORK" "$OUT" "$SDIST"
log "target $TARGET -> $OUT"

# 1. Build environment: the target torch and the CUDA compiler, runtime and headers from PyPI.
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
log "installing torch==$TORCH_VERSION and cuda-toolkit==$CUDA_TOOLKIT_VERSION (several GB the first time)"
"${RUN[@]}" "$PY" -m pip install -q "torch==$TORCH_VERSION" \
    "cuda-toolkit[nvcc,cudart,cublas,cccl,crt,nvvm]==$CUDA_TOOLKIT_VERSION" \
    ninja "setuptools>=68,<79" packaging numpy wheel
read -r TORCH_FULL TORCH_CUDA CXX11_ABI < <("$PY" -c \
    'import torch; print(torch.__version__, torch.version.cuda, int(torch.compiled_with_cxx11_abi()))')
if [[ "$TORCH_CUDA" == "None" ]]; then
    echo "error: torch $TORCH_FULL is a CPU build; pick a torch whose PyPI wheel is a CUDA build" >&2
    exit 1
fi
if [[ "${TORCH_CUDA%%.*}" != "${CUDA_TOOLKIT_VERSION%%.*}" ]]; then
    echo "error: torch $TORCH_FULL is built with CUDA $TORCH_CUDA but --cuda-toolkit is $CUDA_TOOLKIT_VERSION;" \
        "use a toolkit with the same major version" >&2
    exit 1
fi
log "torch $TORCH_FULL (CUDA $TORCH_CUDA, C++11 ABI $CXX11_ABI)"

# 2. A CUDA_HOME for torch's extension builder: bin/nvcc, include/ and lib64/libcudart.so.
# The pip packages ship only versioned libraries (libcudart.so.13), which `-lcudart` cannot
# find, and spread bin/include/lib over nvidia/*/ (CUDA 12) or nvidia/cu13/ (CUDA 13).
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
NVCC=$(find "$SITE/nvidia" -path '*/bin/nvcc' -type f | head -n 1)
[[ -n "$NVCC" ]] || { echo "error: no nvcc under $SITE/nvidia (cuda-toolkit[nvcc] did not install)" >&2; exit 1; }
rm -rf "$CUDA_SHIM"
mkdir -p "$CUDA_SHIM/include" "$CUDA_SHIM/lib64"
ln -s "$(dirname "$NVCC")" "$CUDA_SHIM/bin"
for dir in "$SITE"/nvidia/*/include; do
    for entry in "$dir"/*; do
        [[ -e "$CUDA_SHIM/include/$(basename "$entry")" ]] || ln -s "$entry" "$CUDA_SHIM/include/"
    done
done
for lib in "$SITE"/nvidia/*/lib/lib*.so.*; do
    name=$(basename "$lib")
    [[ -e "$CUDA_SHIM/lib64/$name" ]] || ln -s "$lib" "$CUDA_SHIM/lib64/$name"
    unversioned="${name%%.so.*}.so"
    [[ -e "$CUDA_SHIM/lib64/$unversioned" ]] || ln -s "$lib" "$CUDA_SHIM/lib64/$unversioned"
done
NVCC_VERSION=$("$CUDA_SHIM/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
log "nvcc $NVCC_VERSION from $(dirname "$NVCC")"

# 3. The source archives, checked against PyPI's published SHA-256.
log "downloading the source archives"
(cd "$SDIST" && TORCH_CUDA_ARCH_LIST="$ARCH_LIST" CUDA_HOME="$CUDA_SHIM" "${RUN[@]}" "$PY" -m pip download -q \
    --no-deps --no-build-isolation --no-binary :all: -d . megablocks==0.10.0 stanford-stk==0.7.1 grouped_gemm==0.3.0)
for archive in "${ORDER[@]}"; do
    echo "${SHA256[$archive]}  $SDIST/$archive" | sha256sum --check --quiet - \
        || { echo "error: $archive does not match PyPI's SHA-256" >&2; exit 1; }
done

# megablocks 0.10.0 passes CUB's `debug_synchronous` argument to DeviceScan::ExclusiveSum /
# InclusiveSum (csrc/cumsum.h). CUB 2.0 (CUDA 12) deprecated it and ignored its value; CCCL
# 3.0 (CUDA 13) removed it, so the file does not compile there. Dropping the argument is
# what CUB 2.x did with it anyway. The patched build is labelled 0.10.0+cccl3 (a local
# version: `megablocks==0.10.0` still matches it).
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
tar -xzf "$SDIST/megablocks-0.10.0.tar.gz" -C "$WORK/src"
"$PY" - "$WORK/src/megablocks-0.10.0" <<'EOF'
import re, sys
from pathlib import Path

root = Path(sys.argv[1])
cumsum = root / "csrc" / "cumsum.h"
text, count = re.subn(r",\s*debug_synchronous\)\);", "));", cumsum.read_text())
if count != 2:
    sys.exit(f"error: expected 2 DeviceScan calls with debug_synchronous in {cumsum}, found {count}")
cumsum.write_text(text)
version = root / "megablocks" / "_version.py"
version.write_text(version.read_text().replace("'0.10.0'", "'0.10.0+cccl3'"))
print("patched megablocks 0.10.0 -> 0.10.0+cccl3: csrc/cumsum.h without debug_synchronous")
EOF

# 4. Build. --no-build-isolation compiles against the torch above, not the torch 2.7 that
# megablocks' metadata pins; --no-cache-dir keeps pip from reusing a wheel built for other
# architectures; setting TORCH_CUDA_ARCH_LIST keeps setup.py from asking for a GPU.
export CUDA_HOME="$CUDA_SHIM" TORCH_CUDA_ARCH_LIST="$ARCH_LIST" MAX_JOBS="$JOBS" GROUPED_GEMM_CUTLASS="$CUTLASS"
export PATH="$CUDA_SHIM/bin:$VENV/bin:$PATH"
rm -f "$OUT"/*.whl
TIMES=()  # per archive: wall seconds, CPU seconds of pip and every compiler it ran
TIMEFORMAT='%R %U %S'
for archive in "${ORDER[@]}"; do
    log "building $archive (MAX_JOBS=$JOBS)"
    build_log="$OUT/build-${archive%.tar.gz}.log"
    source="$SDIST/$archive"
    [[ $archive == megablocks-* ]] && source="$WORK/src/megablocks-0.10.0"  # patched above
    if ! { time "${RUN[@]}" "$PY" -m pip wheel -v --no-cache-dir --no-build-isolation --no-deps -w "$OUT" \
        "$source" > "$build_log" 2>&1; } 2> "$OUT/.time"; then
        tail -n 40 "$build_log" >&2
        echo "error: building $archive failed (log: $build_log)" >&2
        exit 1
    fi
    read -r wall user sys < "$OUT/.time"
    TIMES+=("$wall" "$(awk "BEGIN {print $user + $sys}")")
    log "built $archive in $wall s ($(awk "BEGIN {print $user + $sys}") CPU s)"
done
rm -f "$OUT/.time"

# 5. Check what can be checked without a GPU: the wheels install, the CUDA extensions load
# (torch's CUDA libraries do not need a driver to load), and they hold code for each arch.
log "installing the wheels into the build environment and importing them"
"$PY" -m pip install -q --no-index --no-deps --force-reinstall "$OUT"/*.whl
(cd "$WORK" && "$PY" - <<'EOF'
import importlib
for module in ("stk", "grouped_gemm_backend", "grouped_gemm.ops", "megablocks_ops", "megablocks.ops"):
    importlib.import_module(module)
    print("import ok:", module)
EOF
)

"$PY" - "$OUT" "$TARGET" "$TORCH_FULL" "$TORCH_CUDA" "$CXX11_ABI" "$NVCC_VERSION" "$ARCH_LIST" "$CUTLASS" \
    "$JOBS" "$(( $(date +%s) - start_all ))" "${TIMES[@]}" <<'EOF'
"""Write BUILD_INFO.json: what the wheels were built against, and what each needs at run time."""
import hashlib, json, os, platform, re, struct, subprocess, sys, zipfile
from pathlib import Path

out, target, torch_version, cuda, abi, nvcc, arch, cutlass, jobs, total, *times = sys.argv[1:]


def fatbin_code(data: bytes) -> list[str]:
    """The GPU code embedded in a shared library: each fatbinary entry as sm_XX (machine code) or compute_XX (PTX)."""
    found, pos = set(), 0
    while (pos := data.find(struct.pack("<I", 0xBA55ED50), pos)) >= 0:  # fatbinary header magic
        header_size, fat_size = struct.unpack_from("<HQ", data, pos + 6)
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _, entry_header_size, size = struct.unpack_from("<HHIQ", data, entry)
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            found.add(f"{'compute' if kind == 1 else 'sm'}_{sm}")
            entry += entry_header_size + size
        pos = end
    return sorted(found)


def newest(versions: set[bytes]) -> str | None:
    return max((v.decode() for v in versions), key=lambda v: tuple(int(p) for p in v.split(".")), default=None)


wheels = {}
for wheel in sorted(Path(out).glob("*.whl")):
    info = {"bytes": wheel.stat().st_size, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(".so"):
                data = zf.read(name)
                info[name] = {
                    "gpu_code": fatbin_code(data),
                    "needs_glibc": newest(set(re.findall(rb"GLIBC_(\d+\.\d+(?:\.\d+)?)", data))),
                    "needs_glibcxx": newest(set(re.findall(rb"GLIBCXX_(\d+\.\d+(?:\.\d+)?)", data))),
                }
    wheels[wheel.name] = info
packages = ("stanford-stk", "megablocks", "grouped_gemm")  # the build order
wall = {p: float(t) for p, t in zip(packages, times[0::2])}
cpu = {p: float(t) for p, t in zip(packages, times[1::2])}
info = {
    "target": target,
    "torch": torch_version,
    "torch_cuda": cuda,
    "torch_cxx11_abi": bool(int(abi)),
    "nvcc": nvcc,
    "python": platform.python_version(),
    "torch_cuda_arch_list": arch,
    "grouped_gemm_cutlass": cutlass == "1",
    "max_jobs": int(jobs),
    "build_host_cores": os.cpu_count(),
    "build_seconds": wall,
    "build_cpu_seconds": cpu,
    "total_seconds": int(total),
    "patches": ["megablocks: csrc/cumsum.h without CUB's removed debug_synchronous argument (0.10.0+cccl3)"],
    "compiler": subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
    "wheels": wheels,
    "total_bytes": sum(w["bytes"] for w in wheels.values()),
}
Path(out, "BUILD_INFO.json").write_text(json.dumps(info, indent=2) + "\n")
print(json.dumps(info, indent=2))
EOF
log "done: $OUT ($(du -sh "$OUT" | cut -f1)); install with: pip install --no-index --no-deps $OUT/*.whl"
