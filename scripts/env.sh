# Sourced by the other scripts: prepares everything lmim-bench needs and exports the environment.
# - a Python virtual environment with torch==2.11.0 (the libtorch that tch 0.24.0 binds), numpy, safetensors,
#   timm, torchvision, scipy and tensorboard (its event reader checks the event files lmim-bench writes), kept in
#   a cache directory outside the clone so that every clone reuses it;
# - Debian packages: the Fashion-MNIST data set for the demo, gloo's headers for the torch.distributed shim;
# - the build, also kept in the cache (CARGO_TARGET_DIR), so a fresh clone does not rebuild libtorch bindings.
# LMIM_CACHE overrides the cache directory; an existing LIBTORCH (a libtorch unpacked somewhere) is used as is.
set -euo pipefail

LMIM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LMIM_ROOT
export LMIM_CACHE="${LMIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmim-bench}"
mkdir -p "$LMIM_CACHE"
VENV="$LMIM_CACHE/venv"
# nvidia-cuda-crt / -cccl: the CUDA headers that torch's ProcessGroupNCCL.hpp needs and the CUDA runtime wheel lacks,
# at the CUDA 13.0 of torch 2.11's wheels (the build compiles the NCCL part of the c10d shim against them).
PY_REQS="torch==2.11.0 torchvision==0.26.0 numpy safetensors timm scipy pillow tensorboard nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85"
STAMP="$VENV/.lmim-reqs"

log() { printf '[lmim-bench setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$PY_REQS" ]; then
    command -v python3 >/dev/null || { log "python3 is required"; exit 2; }
    log "creating the Python environment in $VENV (torch 2.11.0 from PyPI, a few GB, once)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet $PY_REQS
    echo "$PY_REQS" > "$STAMP"
fi
export LMIM_PYTHON="$VENV/bin/python"

if [ -z "${LIBTORCH:-}" ]; then
    # tch's build script finds libtorch inside the active Python's torch package.
    export LIBTORCH_USE_PYTORCH=1
    export VIRTUAL_ENV="$VENV"
    export PATH="$VENV/bin:$PATH"
fi
export LIBTORCH_BYPASS_VERSION_CHECK="${LIBTORCH_BYPASS_VERSION_CHECK:-0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$LMIM_CACHE/target}"
# faiss's C++ build (cmake, run by faiss-sys) would otherwise compile on one core.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

# Debian packages: cmake and OpenBLAS build faiss (the optional CPU k-NN back-end, cargo feature `faiss`).
apt_install() {
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$@" >/dev/null; }
    elif command -v sudo >/dev/null; then
        sudo apt-get install -y -qq "$@" >/dev/null
    else
        return 1
    fi
}
# Only for builds with the optional `faiss` feature (LMIM_FAISS=1 asks the set-up for them).
if [ "${LMIM_FAISS:-0}" = 1 ] && { ! command -v cmake >/dev/null || ! dpkg -s libopenblas-dev >/dev/null 2>&1; }; then
    log "installing cmake and OpenBLAS (to build faiss)"
    apt_install cmake libopenblas-dev ||
        log "could not install cmake/libopenblas-dev; install them to build with --features faiss"
fi

# The default `turbojpeg` feature (LMIM_TURBOJPEG=0 leaves it out): turbojpeg-sys builds the libjpeg-turbo 3.1 it
# bundles with cmake, and its SIMD code with nasm (Debian 12's libturbojpeg is 2.1, older than the TurboJPEG 3 API
# the crate binds).
if [ "${LMIM_TURBOJPEG:-1}" = 1 ] && { ! command -v cmake >/dev/null || ! command -v nasm >/dev/null; }; then
    log "installing cmake and nasm (to build libjpeg-turbo)"
    apt_install cmake nasm ||
        { log "cmake and nasm are missing: run 'apt-get install cmake nasm' as root, or set LMIM_TURBOJPEG=0 (zune-jpeg)"; exit 2; }
fi

# gloo's headers (the torch wheel ships none) for the c10d shim that build.rs compiles: Debian's libgloo-dev.
if [ -z "${LMIM_GLOO_INCLUDE:-}" ] && [ ! -e /usr/include/gloo/config.h ]; then
    log "installing Debian's libgloo-dev (gloo headers for the torch.distributed shim)"
    apt_install libgloo-dev ||
        { log "gloo headers are missing: run 'apt-get install libgloo-dev' as root, or set LMIM_GLOO_INCLUDE"; exit 2; }
fi

# Fashion-MNIST as Debian ships it: the small real data set of the demo and the tests.
FMNIST_DIR="${LMIM_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if [ ! -e "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] && [ -z "${LMIM_FASHION_MNIST:-}" ]; then
    log "installing Debian's dataset-fashion-mnist"
    apt_install dataset-fashion-mnist ||
        log "Fashion-MNIST is missing: run 'apt-get install dataset-fashion-mnist' as root, or set LMIM_FASHION_MNIST"
fi
export LMIM_FASHION_MNIST="$FMNIST_DIR"
