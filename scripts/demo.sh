#!/usr/bin/env bash
# Sets everything up and runs the embedded default on the CPU: versions, then a forward pass of the tiny ViT on
# generated images.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
cargo build --quiet --bins
BIN="$CARGO_TARGET_DIR/debug/lmim-bench"
"$BIN" info
"$BIN" forward --arch vit_pico_patch4_32 --batch-size 16
