#!/usr/bin/env bash
# The set-up and a build as a user who cannot install packages (a non-root account on a cluster): in a private
# mount namespace, apt-get, apt, dpkg, sudo, cmake and nasm are neither on PATH nor runnable, gloo's headers and
# Debian's Fashion-MNIST are hidden, there is no network beyond localhost, and the file system is read-only except
# for the clone, the cache ($LMIM_CACHE, the venv inside it read-only), ~/.cargo and /tmp. There it sources
# scripts/env.sh and checks what it chose (zune-jpeg, no Gloo, the Fashion-MNIST fallbacks: the message without
# network, torchvision's downloader from a local mirror), builds, and runs `info`, a tiny pretraining, a k-NN
# evaluation, the refusal of a 2-process CPU launch and scripts/install.sh with that binary.
#
# Needs root for the mount namespace (CI runs as root); exit 77 when it cannot make one or its mounts. The build goes to
# $LMIM_CACHE/noroot/target, seeded once from the main target dir, so a run compiles only lmim-bench itself.
#
#     bash scripts/noroot_check.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "${1:-}" != --inside ]; then
    if [ "$(id -u)" != 0 ] || ! command -v unshare >/dev/null || ! unshare --mount true 2>/dev/null; then
        echo "noroot_check: needs root and unshare for a private mount namespace; not run" >&2
        exit 77
    fi
    LMIM_CACHE="${LMIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmim-bench}"
    [ -x "$LMIM_CACHE/venv/bin/python" ] || { echo "noroot_check: no venv in $LMIM_CACHE: source scripts/env.sh first" >&2; exit 2; }
    main_target="${CARGO_TARGET_DIR:-$LMIM_CACHE/target}"
    nr="$LMIM_CACHE/noroot"
    mkdir -p "$nr"
    ln -sfn "$LMIM_CACHE/venv" "$nr/venv"
    # A copy of the main build's dependencies (not lmim-bench's own artifacts nor the test binaries): cargo reuses
    # them, as the features of the other crates do not change. Cargo rewrites the build scripts' output paths.
    if [ ! -d "$nr/target/debug/deps" ] && [ -d "$main_target/debug/deps" ]; then
        echo "noroot_check: seeding $nr/target from $main_target" >&2
        mkdir -p "$nr/target/debug"
        tests=$(cd "$ROOT/tests" && ls ./*.rs | sed 's|^\./||; s|\.rs$||' | tr - _)
        benches=$(cd "$ROOT/benches" && ls ./*.rs | sed 's|^\./||; s|\.rs$||')
        excl=(--exclude='lmim_bench-*' --exclude='liblmim_bench-*' --exclude='lmim-bench-*')
        for t in $tests $benches; do excl+=(--exclude="$t-*"); done
        (cd "$main_target/debug" && tar -cf - "${excl[@]}" deps build .fingerprint) | (cd "$nr/target/debug" && tar -xf -)
    fi
    rm -rf "$nr/fashion-mnist"
    exec unshare --mount --propagation private -- bash "$ROOT/scripts/noroot_check.sh" --inside "$LMIM_CACHE"
fi

# ---- inside the namespace, still root: take away what a cluster user does not have ----
LMIM_CACHE="$2"
nr="$LMIM_CACHE/noroot"
# Writable at the end: the clone, the cache (the venv in it read-only), cargo's home and /tmp, each its own mount
# before anything is mounted below them; the rest of the system is made read-only last.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
# A mount this machine refuses (a container without the capability) means the user's environment cannot be made
# here: that is "not run" (exit 77), not a failure of the set-up under test.
prep() { "$@" || { echo "noroot_check: cannot make the user's environment here ('$*' failed); not run" >&2; exit 77; }; }
for d in /tmp "$cargo_home" "$LMIM_CACHE" "$ROOT"; do [ -d "$d" ] && prep mount --bind "$d" "$d"; done
work="$(mktemp -d /tmp/lmim-noroot.XXXXXX)"
# The mirror below is a bind of Debian's data set: unmounted before the folder is removed.
trap 'umount "$work/fm-mirror" 2>/dev/null; rm -rf "$work"' EXIT
forbidden="apt-get apt apt-cache dpkg dpkg-deb sudo cmake ctest cpack nasm ndisasm"
# PATH: links to every program of the usual folders but the forbidden ones.
mkdir -p "$work/bin"
for d in "$HOME/.cargo/bin" "$HOME/.pyenv/shims" /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    [ -d "$d" ] || continue
    for f in "$d"/*; do
        n="${f##*/}"
        case " $forbidden " in *" $n "*) continue ;; esac
        [ -x "$f" ] && [ ! -e "$work/bin/$n" ] && ln -s "$f" "$work/bin/$n"
    done
done
# ... and the forbidden programs cannot be run by their full path either.
for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    for n in $forbidden; do
        if [ -f "$d/$n" ] && [ ! -L "$d/$n" ]; then prep mount --bind /dev/null "$d/$n"; fi
    done
done
if [ -d /usr/include/gloo ]; then prep mount -t tmpfs none /usr/include/gloo; fi
fm_debian=/usr/share/datasets/fashion-mnist
mkdir -p "$work/fm-mirror"
if [ -d "$fm_debian" ]; then
    prep mount --bind "$fm_debian" "$work/fm-mirror"
    prep mount -o remount,bind,ro "$work/fm-mirror"
    prep mount -t tmpfs none "$fm_debian"
fi
prep mount --bind "$LMIM_CACHE/venv" "$LMIM_CACHE/venv"
prep mount -o remount,bind,ro "$LMIM_CACHE/venv"
prep mount -o remount,bind,ro /

fail() { echo "noroot_check: FAILED: $*" >&2; exit 1; }
# The user's environment: nothing of the caller's set-up, no network beyond localhost (a proxy that refuses).
user_env=(env -i HOME="$HOME" PATH="$work/bin" USER=user TERM=dumb LMIM_CACHE="$nr" CARGO_TARGET_DIR="$nr/target"
    CARGO_HOME="$cargo_home" CARGO_NET_OFFLINE=true TMPDIR=/tmp http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9)
# lmim-bench itself at opt-level 0, for the build here and scripts/install.sh --debug: this checks the set-up's
# choices, not the binary's speed. The dependencies keep the dev profile's opt-level 3, so the seeded ones are reused.
user_env+=(CARGO_PROFILE_DEV_OPT_LEVEL=0)
for v in RUSTUP_HOME RUSTUP_TOOLCHAIN; do [ -n "${!v:-}" ] && user_env+=("$v=${!v}"); done
for n in $forbidden; do
    "${user_env[@]}" bash -c "command -v $n" >/dev/null 2>&1 && fail "$n is still on PATH"
done
touch /etc/lmim-noroot 2>/dev/null && fail "the root file system is writable"
[ -e /usr/include/gloo/config.h ] && fail "gloo's headers are still visible"

# 1. The set-up: what it chose, and what it said.
probe='source scripts/env.sh && printf "turbojpeg=%s features=%s cmake=%s fmnist=%s\n" "$LMIM_TURBOJPEG" "${LMIM_FEATURES[*]}" "${CMAKE:-}" "$LMIM_FASHION_MNIST"'
cd "$ROOT"
"${user_env[@]}" bash -c "$probe" >"$work/setup.out" 2>"$work/setup.err" || { cat "$work/setup.err" >&2; fail "scripts/env.sh"; }
cat "$work/setup.err" >&2
grep -q "turbojpeg=0 features=--no-default-features cmake= " "$work/setup.out" || fail "the set-up chose $(cat "$work/setup.out")"
grep -q "JPEG decoder: zune-jpeg, since nasm is missing" "$work/setup.err" || fail "the set-up did not say which JPEG decoder it chose"
grep -q "gloo headers are missing" "$work/setup.err" || fail "the set-up did not say that Gloo is left out"
grep -q "apt-get install dataset-fashion-mnist.*LMIM_FASHION_MNIST.*torchvision" "$work/setup.err" ||
    fail "without network, the set-up did not name the three ways to get Fashion-MNIST"
[ ! -e "$nr/fashion-mnist" ] || fail "a failed download left $nr/fashion-mnist"

# 2. Fashion-MNIST through torchvision's downloader (md5-checked), from a mirror on localhost.
if [ -f "$work/fm-mirror/train-images-idx3-ubyte.gz" ]; then
    port=$("$LMIM_CACHE/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$LMIM_CACHE/venv/bin/python" -m http.server "$port" --bind 127.0.0.1 --directory "$work/fm-mirror" >/dev/null 2>&1 &
    server=$!
    sleep 1
    "${user_env[@]}" no_proxy=127.0.0.1 LMIM_FASHION_MNIST_MIRROR="http://127.0.0.1:$port/" bash -c "$probe" >"$work/setup2.out" 2>"$work/setup2.err" ||
        { cat "$work/setup2.err" >&2; fail "scripts/env.sh with a mirror"; }
    kill "$server"
    grep -q "fmnist=$nr/fashion-mnist" "$work/setup2.out" || { cat "$work/setup2.err" >&2; fail "the download did not land in the cache: $(cat "$work/setup2.out")"; }
    for f in train-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
        cmp -s "$work/fm-mirror/$f" "$nr/fashion-mnist/$f" || fail "$f differs from the mirror's"
    done
else
    echo "noroot_check: Debian's Fashion-MNIST is not on this machine: the mirror download is not checked" >&2
fi

# 3. The build: zune-jpeg, no Gloo (lmim-bench at opt-level 0: CARGO_PROFILE_DEV_OPT_LEVEL in user_env).
# Not --quiet: it would hide the build script's warnings. The script runs on every commit (it records the commit).
t0=$(date +%s)
"${user_env[@]}" bash -c 'source scripts/env.sh 2>/dev/null && nice -n 10 cargo build --bins "${LMIM_FEATURES[@]}"' 2>"$work/build.err" ||
    { cat "$work/build.err" >&2; fail "cargo build"; }
echo "noroot_check: build took $(( $(date +%s) - t0 )) s, compiled: $(sed -n 's/^ *Compiling \([^ ]*\) .*/\1/p' "$work/build.err" | tr '\n' ' ')" >&2
grep -q "Gloo is left out" "$work/build.err" || { cat "$work/build.err" >&2; fail "the build did not say that Gloo is left out"; }
bin="$nr/target/debug/lmim-bench"
run() { "${user_env[@]}" "$bin" "$@"; }

# 4. What the binary says about itself.
run info --json >"$work/info.json"
"$LMIM_CACHE/venv/bin/python" - "$work/info.json" <<'PY' || fail "info"
import json, sys
i = json.load(open(sys.argv[1]))
# NCCL is built where the CUDA wheels' headers are in the venv (they are, from the set-up); Gloo is not.
assert "gloo" not in i["dist_backends"], i["dist_backends"]
assert i["jpeg_decoder"].startswith("zune-jpeg 0.4."), i["jpeg_decoder"]
PY
run info | grep -q "^c10d .*no Gloo: one process per run on the CPU" || fail "info does not say that Gloo is left out"

# 5. A tiny pretraining and a k-NN evaluation of its encoder; the record names the decoder.
d="$work/run"
run data synth --out "$d/data" --classes 4 --train-per-class 16 --val-per-class 4 --size 40 >/dev/null
run pretrain -q -c configs/lmim_tiny.toml --data "$d/data" -o "$d/pre" --no-tensorboard epochs=1 warmup_epochs=1 \
    batch_size=16 micro_batch_size=16 num_workers=1 nn_every=0 'device="cpu"' || fail "pretrain"
run eval --protocol knn --checkpoint "$d/pre/encoder.safetensors" --data "$d/data" --device cpu --output "$d/runs" --quiet ||
    fail "eval --protocol knn"
"$LMIM_CACHE/venv/bin/python" - "$d/runs" "$d/pre" <<'PY' || fail "the records"
import glob, json, sys
recs = [json.load(open(p)) for p in glob.glob(sys.argv[1] + "/*.json") + glob.glob(sys.argv[2] + "/*.json")]
knn = [r for r in recs if r.get("protocol") == "knn"]
assert knn and 0 <= knn[0]["metrics"]["top1"] <= 100, recs
for r in recs:
    if "provenance" in r:
        assert r["provenance"]["jpeg_decoder"].startswith("zune-jpeg"), r["provenance"]
PY

# 6. Two processes on the CPU: refused before any rendezvous, saying how to get Gloo.
set +e
"${user_env[@]}" RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=9 "$bin" pretrain -q -c configs/lmim_tiny.toml \
    --data "$d/data" -o "$d/dist" --no-tensorboard 'device="cpu"' 2>"$work/dist.err"
rc=$?
set -e
[ "$rc" = 2 ] || { cat "$work/dist.err" >&2; fail "a 2-process CPU launch exited $rc, not 2"; }
grep -q "no Gloo" "$work/dist.err" && grep -q "libgloo-dev" "$work/dist.err" && grep -q "LMIM_GLOO_INCLUDE" "$work/dist.err" ||
    { cat "$work/dist.err" >&2; fail "the refusal does not say how to get Gloo"; }

# 7. On PATH for job scripts: the installed binary starts from another folder with a clean environment.
"${user_env[@]}" bash scripts/install.sh --debug "$work/prefix" >"$work/install.out" 2>&1 || { cat "$work/install.out" >&2; fail "scripts/install.sh"; }
(cd / && env -i HOME="$HOME" PATH=/usr/bin:/bin "$work/prefix/bin/lmim-bench" info --json) | grep -q '"jpeg_decoder": *"zune-jpeg' ||
    fail "the installed lmim-bench does not start on its own"
echo "noroot_check: ok (set-up without a package manager, build without nasm, cmake and gloo, pretrain, k-NN, install)"
