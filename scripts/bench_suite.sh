#!/usr/bin/env bash
# benchmarks/suite.md: `lmim-bench suite suites/demo.toml` against the same protocols as separate `eval` commands
# (what scripts/fashion_mnist_results.sh ran before the suite), side by side in one run on this machine, and the
# suite with --no-cache (every entry extracts its own features), so the shared extraction's saving shows.
# Usage: scripts/bench_suite.sh [ONLY]   ONLY: the suite entries to time (default: the entries on cached features
# and DAVIS: nn-loo,knn,knn-sweep,lowshot,linear-sweep,davis; `all` for the whole demo suite, about 25 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh >/dev/null
cargo build --quiet --bins "${LMIM_FEATURES[@]}"
BIN="$CARGO_TARGET_DIR/debug/lmim-bench"
ONLY="${1:-nn-loo,knn,knn-sweep,lowshot,linear-sweep,davis}"
WORK="${LMIM_BENCH_OUT:-$(mktemp -d)}"
DATA=data/fashion-mnist
"$BIN" data prepare-demo --out "$DATA" >/dev/null
"$BIN" data synth-davis --out data/synth-davis --sequences 3 --frames 8 --size 160x72 >/dev/null
CK="$WORK/random-init.safetensors"
"$BIN" init -c configs/lmim_tiny.toml -o "$CK" 2>/dev/null
only=(); [ "$ONLY" = all ] || only=(--only "$ONLY")
t() { local t0; t0=$(date +%s.%N); "$@" >/dev/null 2>>"$WORK/log"; echo "$(date +%s.%N) - $t0" | bc; }
# The separate commands: each entry of the suite file as `eval`, one process each, the same cache.
separate() {
    local out="$1" cache="$2"
    "$LMIM_PYTHON" - "$ONLY" <<'PY' | while IFS=$'\t' read -r proto data sets; do
import sys, tomllib
only = sys.argv[1].split(",")
suite = tomllib.load(open("suites/demo.toml", "rb"))
for e in suite["eval"]:
    label = e["protocol"] + (":" + e["label"] if "label" in e else "")
    if only != ["all"] and label not in only and e["protocol"] not in only:
        continue
    sets = " ".join(f"{k}={v!r}".replace("'", '"') if isinstance(v, str) else f"{k}={v}" for k, v in e.get("set", {}).items())
    print(f"{e['protocol']}\t{e['data']}\t{sets}")
PY
        root=$([ "$data" = davis ] && echo data/synth-davis || echo "$DATA")
        # shellcheck disable=SC2086
        "$BIN" eval --protocol "$proto" --checkpoint "$CK" --data "$root" --name pico --output "$out" --quiet --cache-dir "$cache" $sets
    done
}
for round in 1 2; do
    rm -rf "$WORK"/{sep,suite,nocache}-* 
    s_sep=$(t separate "$WORK/sep-out" "$WORK/sep-cache")
    s_suite=$(t "$BIN" suite suites/demo.toml "${only[@]}" --checkpoint "$CK" --name pico --output "$WORK/suite-out" --quiet --cache-dir "$WORK/suite-cache" --data demo="$DATA" --data davis=data/synth-davis)
    s_again=$(t "$BIN" suite suites/demo.toml "${only[@]}" --checkpoint "$CK" --name pico --output "$WORK/suite-out" --quiet --cache-dir "$WORK/suite-cache" --data demo="$DATA" --data davis=data/synth-davis)
    s_nocache=$(t "$BIN" suite suites/demo.toml "${only[@]}" --checkpoint "$CK" --name pico --output "$WORK/nocache-out" --quiet --no-cache --data demo="$DATA" --data davis=data/synth-davis)
    echo "round $round: separate evals ${s_sep} s; suite ${s_suite} s; suite again (all kept) ${s_again} s; suite --no-cache ${s_nocache} s"
done
grep -h "features" "$WORK/log" | sed 's/^/  /' | sort | uniq -c | head -20
