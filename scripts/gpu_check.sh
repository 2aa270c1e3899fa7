#!/usr/bin/env bash
# The one-call device check: everything the GPU path has to show, run from a prepared release binary in ONE call
# on a GPU machine that has PyTorch + timm but no Rust and no network (an estimated 7 minutes on one H200):
#   info; ViT-B/16 forward parity with timm on the GPU (fp32, bf16) and the SDPA kernel used; one Latent MIM step on
#   the GPU against the CPU; side by side and alternating: the pretraining step at batch 256 (lmim-bench bf16, the
#   original code fp16 + GradScaler as shipped and in bf16) with img/s, peak memory and MFU, the fine-tuning step at
#   batch 128 beside timm, inference at batch 256 beside timm, k-NN of 50 k x 1.28 M x 768 (beside DINO's code),
#   one epoch of the 52-head sweep over 1.28 M rows, and the loader from 500x375 JPEGs with 16 workers.
# It writes benchmarks/gpu-<device>.md (the device named, the commands) and the raw JSON under --out.
# `--cpu` runs the same steps at tiny sizes on the CPU (CI runs it through tests/gpu_check.rs, so it never rots).
#
# Usage: scripts/gpu_check.sh [--cpu] [--out DIR]
# Environment: LMIM_BIN (the lmim-bench binary; default target/release or the build cache), LMIM_PYTHON (python
# with torch + timm; default python3), LATENTMIM_DIR / DINO_DIR (checkouts of yibingwei-1/LatentMIM and
# facebookresearch/dino, imported from, never committed; their rows are skipped without them), LMIM_PEAK_TFLOPS
# (dense bf16 peak for MFU when the device is not in benches/py/gpu_report.py's table).
# Exit: 0 when every step ran and every parity check passed, 1 otherwise (the report says which).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${LMIM_PYTHON:-python3}"
BIN="${LMIM_BIN:-}"
if [ -z "$BIN" ]; then
    for b in "$ROOT/target/release/lmim-bench" "${CARGO_TARGET_DIR:-$HOME/.cache/lmim-bench/target}/release/lmim-bench" "${CARGO_TARGET_DIR:-$HOME/.cache/lmim-bench/target}/debug/lmim-bench"; do
        [ -x "$b" ] && { BIN="$b"; break; }
    done
fi
[ -x "$BIN" ] || { echo "gpu_check.sh: no lmim-bench binary (set LMIM_BIN)" >&2; exit 2; }
THREADS="$(nproc)"
# A binary built elsewhere runs against this machine's torch libraries (the rpath points to the build machine's).
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"
[ -n "$TORCH_LIB" ] && export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$MODE" = gpu ]; then
    DEV=cuda
    VIT=vit_base_patch16_224; PAR_BATCH=32
    LMIM_CFG="$ROOT/configs/lmim_vit_base.toml"; STEP_PAR_BATCH=8
    PRE_BATCH=256; FT_BATCH=128; INF_BATCH=256; WARM=3; STEPS=10
    KNN=(--n-bank 1281167 --n-query 50000 --dim 768); SWEEP_N=1281167
    SYNTH=(--classes 16 --train-per-class 256); LOADER=(--batch-size 256 --workers 16); LOADER_BATCHES=16
    ORIG_BATCH=256; ORIG_AMPS=(fp16 bf16); PREC=bf16
else
    DEV=cpu
    VIT=vit_tiny_patch16_224; PAR_BATCH=2
    LMIM_CFG="$ROOT/configs/lmim_tiny.toml"; STEP_PAR_BATCH=4
    PRE_BATCH=16; FT_BATCH=4; INF_BATCH=8; WARM=1; STEPS=2
    KNN=(--n-bank 5000 --n-query 500 --dim 64); SWEEP_N=1000
    SYNTH=(--classes 4 --train-per-class 16); LOADER=(--batch-size 16 --workers 2); LOADER_BATCHES=4
    ORIG_BATCH=2; ORIG_AMPS=(none); PREC=f32
fi

FAILED=()
# step NAME SECONDS CMD...: stdout to $OUT/NAME.json, stderr to $OUT/NAME.err; a failure is recorded, not fatal.
step() {
    local name="$1" secs="$2"; shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >>"$OUT/steps.tsv"
    [ $rc -eq 0 ] || { FAILED+=("$name"); echo "gpu_check: $name failed (exit $rc, see $OUT/$name.err)" >&2; }
}
: >"$OUT/steps.tsv"
echo "$MODE" >"$OUT/mode"

step info 60 "$BIN" info
step python-info 60 "$PY" -c "import json, torch, timm; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, 'timm': timm.__version__, 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if c else 'cpu', 'cudnn': torch.backends.cudnn.version() if c else None}))"

# Parity: timm writes its weights and outputs on this device, lmim-bench compares.
step parity-ref 120 "$PY" "$ROOT/benches/py/gpu_side.py" parity-ref "$VIT" "$PAR_BATCH" "$DEV" "$OUT/parity"
step parity 120 "$BIN" bench --device "$DEV" parity --weights "$OUT/parity/weights.safetensors" --io "$OUT/parity/io.safetensors" --arch "$VIT"
step step-parity 180 "$BIN" bench --device "$DEV" step-parity -c "$LMIM_CFG" --batch-size "$STEP_PAR_BATCH"

# Pretraining step, alternating lmim-bench and the original code.
ours_pre() { step "pretrain-ours-$1" 240 "$BIN" bench --device "$DEV" --warmup "$WARM" --steps "$STEPS" pretrain -c "$LMIM_CFG" --batch-size "$PRE_BATCH" --set "precision=$PREC"; }
orig_pre() {
    if [ -n "${LATENTMIM_DIR:-}" ]; then
        step "pretrain-original-$1" 240 "$PY" "$ROOT/benches/py/lmim_original_step.py" "$LATENTMIM_DIR" "$ORIG_BATCH" "$STEPS" "$THREADS" "$DEV" "$1"
    fi
}
ours_pre 1
for amp in "${ORIG_AMPS[@]}"; do orig_pre "$amp"; done
ours_pre 2

# Fine-tuning step beside timm (MAE's recipe), inference beside timm.
step finetune-ours 240 "$BIN" bench --device "$DEV" --precision "$PREC" --warmup "$WARM" --steps "$STEPS" finetune --arch "$VIT" --batch-size "$FT_BATCH"
TIMM_AMP=$([ "$MODE" = gpu ] && echo bf16 || echo none)
step finetune-timm 240 "$PY" "$ROOT/benches/py/timm_finetune_step.py" "$VIT" "$FT_BATCH" "$STEPS" "$THREADS" "$DEV" "$TIMM_AMP"
[ "$MODE" = gpu ] && step finetune-timm-fp16 240 "$PY" "$ROOT/benches/py/timm_finetune_step.py" "$VIT" "$FT_BATCH" "$STEPS" "$THREADS" "$DEV" fp16
step infer-ours 120 "$BIN" bench --device "$DEV" --precision "$PREC" --warmup "$WARM" --steps "$STEPS" infer --arch "$VIT" --batch-size "$INF_BATCH"
step infer-timm 120 "$PY" "$ROOT/benches/py/gpu_side.py" infer "$VIT" "$INF_BATCH" "$STEPS" "$DEV" "$TIMM_AMP"

# k-NN, the sweep, the loader.
step knn-ours 180 "$BIN" bench --device "$DEV" knn "${KNN[@]}"
if [ -n "${DINO_DIR:-}" ]; then
    step knn-dino 180 "$PY" "$ROOT/benches/py/gpu_side.py" knn-dino "$DINO_DIR" "${KNN[1]}" "${KNN[3]}" "${KNN[5]}" 20 "$DEV"
fi
step sweep 240 "$BIN" bench --device "$DEV" sweep --n "$SWEEP_N" --dim 768 --classes 1000 --set epochs=1
step synth 180 "$BIN" data synth --out "$OUT/jpegs" "${SYNTH[@]}" --val-per-class 1 --size 500x375
step loader 120 "$BIN" bench --steps "$LOADER_BATCHES" loader --data "$OUT/jpegs" "${LOADER[@]}"

"$PY" "$ROOT/benches/py/gpu_report.py" "$OUT" "$ROOT" "${FAILED[*]:-}"
rc=$?
[ ${#FAILED[@]} -eq 0 ] && [ $rc -eq 0 ]
