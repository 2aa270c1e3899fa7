#!/usr/bin/env bash
# Sets everything up (Python venv with torch 2.11 + timm for the reference scripts, the Fashion-MNIST package) and
# runs the whole test suite. CI runs exactly this (.ci/run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
# LMIM_FEATURES: the set-up's JPEG decoder (zune-jpeg where nasm is missing or LMIM_TURBOJPEG=0).
cargo build --quiet --bins "${LMIM_FEATURES[@]}"
exec cargo test --no-fail-fast "${LMIM_FEATURES[@]}" -- --test-threads="${LMIM_TEST_THREADS:-2}" "$@"
