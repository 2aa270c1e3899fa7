#!/usr/bin/env bash
# One Latent MIM pretraining step of ViT-B/16 (the reference command's model: 280-px crops, 20 visible patches,
# decoder depth 3, projection heads) on the CPU: lmim-bench's `bench pretrain` and, when LATENTMIM_DIR points at a
# checkout of github.com/yibingwei-1/LatentMIM (not part of this project), the original PyTorch code through
# benches/py/lmim_original_step.py, timed alternately in one run. Writes benchmarks/pretrain_step_cpu.md.
# BATCH (4), STEPS (3) and THREADS (all cores) override the sizes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
cargo build --quiet --bins "${LMIM_FEATURES[@]}"
BIN="$CARGO_TARGET_DIR/debug/lmim-bench"
BATCH="${BATCH:-4}"; STEPS="${STEPS:-3}"; THREADS="${THREADS:-$(nproc)}"
TMP="$(mktemp -d)"
ours() { OMP_NUM_THREADS="$THREADS" "$BIN" bench pretrain -c configs/lmim_vit_base.toml --device cpu --batch-size "$BATCH" \
    --warmup 1 --steps "$STEPS" --set precision=f32 -o "$TMP/ours-$1.json"; }
theirs() {
    if [ -n "${LATENTMIM_DIR:-}" ]; then
        "$LMIM_PYTHON" benches/py/lmim_original_step.py "$LATENTMIM_DIR" "$BATCH" "$STEPS" "$THREADS" > "$TMP/theirs-$1.json"
    fi
}
ours 1; theirs 1; ours 2; theirs 2
"$LMIM_PYTHON" - "$TMP" "$BATCH" "$THREADS" <<'PY' > benchmarks/pretrain_step_cpu.md
import glob, json, os, subprocess, sys
tmp, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3]
load = lambda pat: [json.load(open(f)) if f.startswith(tmp + "/ours") else json.loads(open(f).read()) for f in sorted(glob.glob(f"{tmp}/{pat}-*.json"))]
ours, theirs = load("ours"), load("theirs")
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
print("# Latent MIM pretraining step, ViT-B/16, CPU: lmim-bench vs the original PyTorch code\n")
print(f"Machine: {cpu}, {threads} threads, fp32 (no GPU in this task). Command: `LATENTMIM_DIR=/path/to/LatentMIM bash scripts/bench_pretrain.sh`.")
print(f"Batch {batch} of random 280 x 280 images; one step = masking/patchify, EMA update of the target, target and")
print("online encoders, decoder, InfoNCE + average-similarity loss, backward, AdamW. Both sides are timed twice,")
print("alternately, in one run (warm-up steps first; lmim-bench: the timed steps as one epoch with one device read at")
print("its end, s/step = their mean; the original: the median of per-step times); peak memory is the process's peak RSS.\n")
print("| implementation | s/step (run 1 / run 2) | img/s (mean) | peak RSS MiB |")
print("|---|---|---|---|")
def row(name, rs, key_s, key_rate, key_mem):
    s = " / ".join(f"{r[key_s]:.2f}" for r in rs)
    rate = sum(r[key_rate] for r in rs) / len(rs)
    mem = max(r[key_mem] or 0 for r in rs)
    print(f"| {name} | {s} | {rate:.2f} | {mem:.0f} |")
    return rate
a = row("lmim-bench " + ours[0]["provenance"]["git_commit"][:12], ours, "s_per_step", "items_per_s", "peak_rss_mib")
if theirs:
    b = row(f"yibingwei-1/LatentMIM {str(theirs[0]['commit'])[:12]} (torch {theirs[0]['torch']})", theirs, "s_per_step", "img_per_s", "peak_rss_mib")
    print(f"\nRatio lmim-bench / original: **{a / b:.2f}x** img/s.")
else:
    print("\nThe original code was not run (LATENTMIM_DIR unset).")
PY
rm -rf "$TMP"
cat benchmarks/pretrain_step_cpu.md
