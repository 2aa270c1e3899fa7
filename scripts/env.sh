# Sourced by the other scripts: prepares everything lmim-bench needs and exports the environment.
# - a Python virtual environment with torch==2.11.0 (the libtorch that tch 0.24.0 binds), numpy, safetensors,
#   timm, torchvision, scipy and tensorboard (its event reader checks the event files lmim-bench writes), the DAVIS
#   and low-shot references (OpenCV, scikit-image, scikit-learn, cyanure), kept in
#   a cache directory outside the clone so that every clone reuses it;
# - the build's tools and data, each from the system when it is there, else with apt-get where the user may run it
#   (root, or sudo without a password), else without a package manager: cmake (PyPI's, into the venv), nasm (without
#   it JPEGs decode with zune-jpeg), gloo's headers (without them the shim has no Gloo), Fashion-MNIST (torchvision's
#   downloader into the cache);
# - the build, also kept in the cache (CARGO_TARGET_DIR), so a fresh clone does not rebuild libtorch bindings.
# LMIM_CACHE overrides the cache directory; an existing LIBTORCH (a libtorch unpacked somewhere) is used as is.
# Nothing is written outside the clone, the cache and the venv, except by a package manager the user may run.
# Exports LMIM_TURBOJPEG (1: libjpeg-turbo, 0: zune-jpeg) and sets LMIM_FEATURES, the cargo flags of that choice.
set -euo pipefail

LMIM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LMIM_ROOT
export LMIM_CACHE="${LMIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmim-bench}"
mkdir -p "$LMIM_CACHE"
VENV="$LMIM_CACHE/venv"
# nvidia-cuda-crt / -cccl: the CUDA headers that torch's ProcessGroupNCCL.hpp needs and the CUDA runtime wheel lacks,
# at the CUDA 13.0 of torch 2.11's wheels (the build compiles the NCCL part of the c10d shim against them).
# opencv-python-headless, scikit-image: the DAVIS references (DINO's frame reading, davis2017-evaluation's boundary
# measure); scikit-learn, cyanure: the low-shot references (MSN's logistic regression and preprocessing).
PY_REQS="torch==2.11.0 torchvision==0.26.0 numpy safetensors timm scipy pillow==11.3.0 tensorboard nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 opencv-python-headless==4.12.0.88 scikit-image==0.26.0 scikit-learn==1.9.1 cyanure==1.2.2"
STAMP="$VENV/.lmim-reqs"

log() { printf '[lmim-bench setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$PY_REQS" ]; then
    command -v python3 >/dev/null || { log "python3 is required"; exit 2; }
    log "creating the Python environment in $VENV (torch 2.11.0 from PyPI, a few GB, once)"
    python3 -m venv "$VENV"
    # --no-cache-dir: pip's cache would be a second copy of the wheels outside the cache, in ~/.cache/pip.
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir $PY_REQS
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

# apt-get, where this user may run it: as root, or through sudo without a password prompt (a cluster's sudo asks
# for one, or refuses).
can_apt() {
    command -v apt-get >/dev/null || return 1
    [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }
}
apt_install() {
    can_apt || return 1
    local sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo -n)
    "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null 2>&1 ||
        { "${sudo[@]}" apt-get update -qq >/dev/null 2>&1 && "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null; }
}

# cmake for the C builds that cargo drives (libjpeg-turbo, faiss): the one on PATH, else Debian's, else PyPI's in
# the venv; the cmake crate runs the one that CMAKE names.
need_cmake() {
    if command -v cmake >/dev/null || { [ -n "${CMAKE:-}" ] && [ -x "$CMAKE" ]; }; then return 0; fi
    if [ -x "$VENV/bin/cmake" ]; then export CMAKE="$VENV/bin/cmake"; return 0; fi
    if can_apt; then
        log "installing Debian's cmake (for $1)"
        apt_install cmake && return 0
    fi
    log "installing PyPI's cmake into $VENV (for $1)"
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir "$CMAKE_REQ" ||
        { log "could not install cmake with pip: put a cmake on PATH (e.g. 'module load cmake') and run again"; return 1; }
    export CMAKE="$VENV/bin/cmake"
}
CMAKE_REQ="cmake==4.1.*"

# Only for builds with the optional `faiss` feature (LMIM_FAISS=1 asks the set-up for cmake and OpenBLAS).
if [ "${LMIM_FAISS:-0}" = 1 ]; then
    need_cmake "faiss" || exit 2
    if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
        log "installing OpenBLAS (to build faiss)"
        apt_install libopenblas-dev || log "could not install libopenblas-dev; install it to build with --features faiss"
    fi
fi

# The JPEG decoder. The default feature `turbojpeg` builds the libjpeg-turbo 3.1 that turbojpeg-sys bundles, with
# cmake, and its SIMD code with nasm (Debian 12's libturbojpeg is 2.1, older than the TurboJPEG 3 API the crate
# binds). Without nasm it would build without SIMD, which decodes slower than zune-jpeg (benchmarks/data_pipeline.md),
# so zune-jpeg is chosen instead. LMIM_TURBOJPEG=0 or 1 decides instead of the machine.
if [ -z "${LMIM_TURBOJPEG:-}" ]; then
    if ! command -v nasm >/dev/null && can_apt; then
        log "installing Debian's nasm (to build libjpeg-turbo's SIMD code)"
        apt_install nasm || true
    fi
    if command -v nasm >/dev/null; then LMIM_TURBOJPEG=1; else LMIM_TURBOJPEG=0; fi
fi
case "$LMIM_TURBOJPEG" in
    1)
        command -v nasm >/dev/null ||
            { log "LMIM_TURBOJPEG=1 needs nasm on PATH (libjpeg-turbo's SIMD code): install it ('module load nasm', apt-get install nasm) or leave LMIM_TURBOJPEG unset for zune-jpeg"; exit 2; }
        need_cmake "libjpeg-turbo" || exit 2
        LMIM_FEATURES=()
        log "JPEG decoder: libjpeg-turbo with SIMD (nasm found)"
        ;;
    0)
        LMIM_FEATURES=(--no-default-features)
        if command -v nasm >/dev/null; then
            log "JPEG decoder: zune-jpeg (LMIM_TURBOJPEG=0)"
        else
            log "JPEG decoder: zune-jpeg, since nasm is missing (libjpeg-turbo without its SIMD code is slower than zune-jpeg, benchmarks/data_pipeline.md); with nasm on PATH the next build takes libjpeg-turbo"
        fi
        ;;
    *) log "LMIM_TURBOJPEG=$LMIM_TURBOJPEG: expected 0 (zune-jpeg) or 1 (libjpeg-turbo)"; exit 2 ;;
esac
export LMIM_TURBOJPEG

# gloo's headers (the torch wheel ships none) for the Gloo part of the c10d shim: Debian's libgloo-dev, or the folder
# LMIM_GLOO_INCLUDE names. Without them the build leaves Gloo out: everything runs, but on the CPU one process per run.
if [ -n "${LMIM_GLOO_INCLUDE:-}" ]; then
    [ -e "$LMIM_GLOO_INCLUDE/gloo/config.h" ] ||
        { log "LMIM_GLOO_INCLUDE=$LMIM_GLOO_INCLUDE: no gloo/config.h there (it must name the folder holding gloo/)"; exit 2; }
elif [ ! -e /usr/include/gloo/config.h ]; then
    if can_apt; then
        log "installing Debian's libgloo-dev (gloo headers for the torch.distributed shim)"
        apt_install libgloo-dev || true
    fi
    [ -e /usr/include/gloo/config.h ] ||
        log "gloo headers are missing: the build leaves Gloo out (CPU runs are one process; NCCL is unaffected). For Gloo: apt-get install libgloo-dev, or set LMIM_GLOO_INCLUDE to a folder holding gloo/"
fi

# Fashion-MNIST, the small real data set of the demo and the tests: the folder LMIM_FASHION_MNIST names, else
# Debian's dataset-fashion-mnist, else a copy that torchvision's downloader put in the cache.
FMNIST_FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
has_fmnist() {
    local f
    for f in $FMNIST_FILES; do [ -f "$1/$f" ] || return 1; done
}
# torchvision's FashionMNIST downloader, into the cache. LMIM_FASHION_MNIST_MIRROR names another mirror (a URL prefix
# of the four files), whose gzip files may be compressed differently from torchvision's (whose md5 it then skips):
# every file is checked by the md5 of its uncompressed IDX content (as Debian's dataset-fashion-mnist has it).
download_fmnist() {
    "$VENV/bin/python" - "$1" <<'PY'
import gzip, hashlib, os, shutil, socket, sys, tempfile
from torchvision.datasets import FashionMNIST
IDX_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
socket.setdefaulttimeout(30)
dest = sys.argv[1]
mirror = os.environ.get("LMIM_FASHION_MNIST_MIRROR")
if mirror:
    FashionMNIST.mirrors = [mirror.rstrip("/") + "/"]
    FashionMNIST.resources = [(f, None) for f, _ in FashionMNIST.resources]
tmp = tempfile.mkdtemp(prefix="fashion-mnist.tmp-", dir=os.path.dirname(dest))
try:
    sys.stdout = sys.stderr
    FashionMNIST(tmp, train=True, download=True)
    raw = os.path.join(tmp, "FashionMNIST", "raw")
    for f, md5 in IDX_MD5.items():
        with gzip.open(os.path.join(raw, f)) as g:
            got = hashlib.md5(g.read()).hexdigest()
        if got != md5:
            raise RuntimeError(f"{f}: md5 of its content is {got}, not Fashion-MNIST's {md5}")
    os.makedirs(dest, exist_ok=True)
    for f in IDX_MD5:
        os.replace(os.path.join(raw, f), os.path.join(dest, f))
except Exception as e:
    print(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__, file=sys.__stderr__)
    sys.exit(1)
finally:
    shutil.rmtree(tmp, ignore_errors=True)
PY
}
FMNIST_DEBIAN=/usr/share/datasets/fashion-mnist
FMNIST_CACHE="$LMIM_CACHE/fashion-mnist"
if [ -n "${LMIM_FASHION_MNIST:-}" ]; then
    has_fmnist "$LMIM_FASHION_MNIST" || log "LMIM_FASHION_MNIST=$LMIM_FASHION_MNIST lacks some of $FMNIST_FILES"
elif has_fmnist "$FMNIST_DEBIAN"; then
    LMIM_FASHION_MNIST="$FMNIST_DEBIAN"
elif has_fmnist "$FMNIST_CACHE"; then
    LMIM_FASHION_MNIST="$FMNIST_CACHE"
else
    if can_apt; then
        log "installing Debian's dataset-fashion-mnist"
        apt_install dataset-fashion-mnist || true
    fi
    if has_fmnist "$FMNIST_DEBIAN"; then
        LMIM_FASHION_MNIST="$FMNIST_DEBIAN"
    else
        log "downloading Fashion-MNIST with torchvision into $FMNIST_CACHE (30 MB, once)"
        if why="$(download_fmnist "$FMNIST_CACHE" 2>&1 >/dev/null)"; then
            LMIM_FASHION_MNIST="$FMNIST_CACHE"
        else
            log "Fashion-MNIST is missing (the demo and some tests need it), and the download failed: ${why##*$'\n'}"
            log "  get it one of three ways: apt-get install dataset-fashion-mnist (root); set LMIM_FASHION_MNIST to a folder holding $FMNIST_FILES; or run this set-up again where the network reaches torchvision's mirror (LMIM_FASHION_MNIST_MIRROR names another)"
            LMIM_FASHION_MNIST="$FMNIST_DEBIAN"
        fi
    fi
fi
export LMIM_FASHION_MNIST
