#!/usr/bin/env bash
# benchmarks/lowshot.md: the low-shot logistic regression on ImageNet-shaped features, lmim-bench (bench lowshot)
# beside scikit-learn's LogisticRegression (lbfgs) and cyanure (MSN's call), one after the other on this machine.
# Usage: scripts/bench_lowshot.sh [N] [CLASSES] [DEVICE]
#   N rows (default 12811 = 1 % of ImageNet-1K), CLASSES (default 1000), DEVICE (default cpu); 768 features.
#   LOWSHOT_BENCH_CYANURE=0 leaves cyanure out (the slowest, about 10 minutes at the default size on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh >/dev/null
N="${1:-12811}"; C="${2:-1000}"; DEV="${3:-cpu}"; D=768; LAMBD=0.0025
OUT="${LMIM_BENCH_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
"$LMIM_PYTHON" tests/py/ref_lowshot.py make "$N" "$D" "$C" 0 "$OUT/features.safetensors"
BIN="${CARGO_TARGET_DIR:-target}/release/lmim-bench"
[ -x "$BIN" ] || BIN="${CARGO_TARGET_DIR:-target}/debug/lmim-bench"
"$BIN" bench lowshot --device "$DEV" --steps 1 --features "$OUT/features.safetensors" --set "lambd=$LAMBD" -o "$OUT/lmim.json"
"$LMIM_PYTHON" tests/py/ref_lowshot.py bench "$N" "$D" "$C" "$LAMBD" "$OUT/ref.json" "$OUT/features.safetensors"
"$LMIM_PYTHON" - "$OUT/lmim.json" "$OUT/ref.json" <<'PY'
import json, sys
a = json.load(open(sys.argv[1])); r = json.load(open(sys.argv[2]))
best = min([a["solve"]["objective"]] + [v["objective"] for v in r.values()])
print(f"n={a['n']} dim={a['dim']} classes={a['classes']} lambd={a['lambd']} device={a['provenance'].get('device')} threads={a['threads']}")
print(f"{'solver':<28}{'seconds':>10}{'objective':>22}{'rel. above best':>18}")
rows = [("lmim-bench L-BFGS f64", a["seconds"], a["solve"]["objective"])] + [(k, v["seconds"], v["objective"]) for k, v in r.items()]
for name, s, o in rows:
    print(f"{name:<28}{s:>10.2f}{o:>22.12f}{(o - best) / abs(best):>18.2e}")
print(f"lmim-bench: {a['solve']['iterations']} iterations, max |grad| {a['solve']['grad_max']:.2e}, converged {a['solve']['converged']}")
PY
