#!/usr/bin/env bash
# DAVIS label propagation on the CPU: `lmim-bench eval --protocol davis` against DINO's loop (its
# eval_video_segmentation.py algorithm as tests/py/ref_davis.py reimplements it: one frame per forward, the
# neighbourhood mask built once), side by side in one run on the same generated 854x480 frames and the same seeded
# ViT-S/16 and ViT-B/16 checkpoints, at DINO's 480p reading. Writes benchmarks/davis.md.
# DAVIS_BENCH_FRAMES (default 6) frames of one sequence; LMIM_BENCH_BIN: an lmim-bench binary already built (else
# `cargo build --bins`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
frames=${DAVIS_BENCH_FRAMES:-6}
bin="${LMIM_BENCH_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --bins "${LMIM_FEATURES[@]}" >/dev/null
    bin="$CARGO_TARGET_DIR/debug/lmim-bench"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" data synth-davis --out "$work/set" --sequences 1 --frames "$frames" --size 854x480 >/dev/null
rows=""
for arch in vit_small_patch16_224 vit_base_patch16_224; do
    "$LMIM_PYTHON" tests/py/ref_davis.py timm "$arch" "$work/$arch.safetensors"
    t0=$(date +%s.%N)
    "$bin" eval --protocol davis --device cpu --quiet --json --checkpoint "$work/$arch.safetensors" --data "$work/set" \
        --output "$work/runs-$arch" > "$work/$arch.json"
    t1=$(date +%s.%N)
    "$LMIM_PYTHON" tests/py/ref_davis.py bench "$work/set" "$work/$arch.safetensors" "$arch" 480 "$frames" "$work/$arch-dino.json"
    rows+="$arch $t0 $t1 $work/$arch.json $work/$arch-dino.json"$'\n'
done
"$LMIM_PYTHON" - "$frames" "$(nproc)" <<PY > benchmarks/davis.md
import json, subprocess, sys
frames, threads = int(sys.argv[1]), sys.argv[2]
rows = [l.split() for l in """$rows""".strip().splitlines()]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
print("# DAVIS-2017 label propagation: lmim-bench vs DINO's algorithm (CPU)\n")
print(f"Machine: {cpu}, {threads} threads (shared with other jobs), fp32. Command: \`bash scripts/bench_davis.sh\`")
print(f"(DAVIS_BENCH_FRAMES={frames}). One generated sequence of {frames} frames at 854x480 (DAVIS 480p), read as DINO")
print("reads them (832x480, a 30x52 patch grid), seeded random ViT-S/16 and ViT-B/16 weights (the speed does not depend")
print("on the values). lmim-bench: the whole \`eval --protocol davis\` command (reading, batched features, propagation,")
print("writing the masks, J&F scoring, the record), debug build profile (dependencies at opt-level 3, the crate at 1).")
print("DINO: its eval loop as tests/py/ref_davis.py reimplements it (one frame per forward, as its script; torch 2.11:")
print("DINO's file itself asks for PyTorch 1.7.1 and fetches a palette over the network), reading and writing")
print("included, no scoring. Both on the same CPU in one run.\n")
print("| model | frames | lmim-bench s (frames/s) | of which features + propagation frames/s | DINO's loop s (frames/s) | ratio |")
print("|---|---|---|---|---|---|")
for arch, t0, t1, rec, dino in rows:
    r = json.load(open(rec)); d = json.load(open(dino))
    ours = float(t1) - float(t0)
    fps = frames / ours
    inner = r["details"]["frames_per_second"]
    print(f"| {arch} | {frames} | {ours:.1f} ({fps:.2f}) | {inner:.2f} | {d['seconds']:.1f} ({d['frames_per_second']:.2f}) | {fps / d['frames_per_second']:.2f} |")
print()
PY
cat benchmarks/davis.md
