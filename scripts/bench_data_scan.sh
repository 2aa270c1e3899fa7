#!/usr/bin/env bash
# Opening an ImageNet-shaped ImageFolder, lmim-bench vs torchvision's ImageFolder, side by side in one run on the
# same generated trees (1000 class folders of empty .JPEG files, in /tmp, deleted afterwards), and the loader from
# tar shards vs from the folder on the same JPEGs; writes benchmarks/data_scan.md (scripts/bench_data_scan.py).
#   LMIM_SCAN_SIZES   files per tree (default "130000 1331000")
#   LMIM_BENCH_BIN    an lmim-bench binary to measure (default: the release build, made here)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
if [ -z "${LMIM_BENCH_BIN:-}" ]; then
    cargo build --quiet --release --bins
    LMIM_BENCH_BIN="$CARGO_TARGET_DIR/release/lmim-bench"
fi
export LMIM_BENCH_BIN
exec "$LMIM_PYTHON" scripts/bench_data_scan.py --sizes ${LMIM_SCAN_SIZES:-130000 1331000} --out benchmarks/data_scan.md
