#!/usr/bin/env bash
# Sets everything up (Python venv with torch 2.11 + timm for the reference scripts, the Fashion-MNIST package) and
# runs the whole test suite. CI runs exactly this (.ci/run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
# LMIM_TURBOJPEG=0: build and test without libjpeg-turbo (zune-jpeg decodes JPEGs).
features=()
if [ "${LMIM_TURBOJPEG:-1}" = 0 ]; then features=(--no-default-features); fi
cargo build --quiet --bins "${features[@]}"
exec cargo test --no-fail-fast "${features[@]}" -- --test-threads="${LMIM_TEST_THREADS:-2}" "$@"
