#!/usr/bin/env bash
# Sets everything up (Python venv with torch 2.11 + timm for the reference scripts, the Fashion-MNIST package) and
# runs the whole test suite. CI runs exactly this (.ci/run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
cargo build --quiet --bins
exec cargo test --no-fail-fast -- --test-threads="${LMIM_TEST_THREADS:-2}" "$@"
