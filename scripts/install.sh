#!/usr/bin/env bash
# Puts lmim-bench on PATH for job scripts: builds it as the set-up chose (scripts/env.sh) and copies the binary to
# PREFIX/bin (default ~/.local/bin), so an sbatch file calls `lmim-bench`, not a path inside the cache. The binary
# finds libtorch through the rpath it carries (the torch package in $LMIM_CACHE/venv), so it runs from any folder
# without LD_LIBRARY_PATH as long as that venv stays where it is.
#
#     bash scripts/install.sh [--debug] [PREFIX]
#
# --debug installs the debug build (faster to build, slower to train); the default is the release build.
set -euo pipefail
usage() { echo "usage: bash scripts/install.sh [--debug] [PREFIX]   (PREFIX default: ~/.local)" >&2; exit 2; }
profile=release
prefix=
for arg in "$@"; do
    case "$arg" in
        --debug) profile=debug ;;
        -h|--help) usage ;;
        -*) echo "scripts/install.sh: unknown option $arg" >&2; usage ;;
        *) [ -z "$prefix" ] || { echo "scripts/install.sh: one PREFIX only (got $prefix and $arg)" >&2; usage; }; prefix="$arg" ;;
    esac
done
prefix="${prefix:-$HOME/.local}"
user_path="$PATH"

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
if [ "$profile" = release ]; then
    cargo build --quiet --release --bin lmim-bench "${LMIM_FEATURES[@]}"
else
    cargo build --quiet --bin lmim-bench "${LMIM_FEATURES[@]}"
fi

mkdir -p "$prefix/bin" || { echo "scripts/install.sh: cannot create $prefix/bin" >&2; exit 2; }
# Copied beside the target and renamed over it: a job still running the old binary keeps it.
tmp="$prefix/bin/.lmim-bench.tmp-$$"
cp "$CARGO_TARGET_DIR/$profile/lmim-bench" "$tmp"
chmod 755 "$tmp"
mv -f "$tmp" "$prefix/bin/lmim-bench"

# The installed copy must start on its own: no LD_LIBRARY_PATH, no venv on PATH, another folder.
if ! (cd / && env -u LD_LIBRARY_PATH -u VIRTUAL_ENV "$prefix/bin/lmim-bench" info >/dev/null); then
    echo "scripts/install.sh: $prefix/bin/lmim-bench does not start (is its libtorch, $LMIM_CACHE/venv, still there?)" >&2
    exit 1
fi
echo "installed $prefix/bin/lmim-bench ($profile build)"
case ":$user_path:" in
    *":$prefix/bin:"*) ;;
    *) echo "$prefix/bin is not on PATH: add 'export PATH=\"$prefix/bin:\$PATH\"' to ~/.bashrc (or to the job script)" ;;
esac
