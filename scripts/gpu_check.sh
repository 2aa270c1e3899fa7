#!/usr/bin/env bash
# The one-call device check: everything the GPU path has to show, run from a prepared release binary in ONE call
# on a GPU machine that has PyTorch + timm but no Rust and no network, within a 9-minute budget on one H200:
#   info; ViT-B/16 forward parity with timm on the GPU (fp32, bf16) and the SDPA kernel used; one Latent MIM step on
#   the GPU against the CPU; side by side and alternating: the pretraining step at batch 256 (lmim-bench bf16, the
#   original code fp16 + GradScaler as shipped and in bf16) with img/s, peak memory and MFU, the fine-tuning step at
#   batch 128 beside timm, inference at batch 256 beside timm, k-NN of 50 k x 1.28 M x 768 (beside DINO's code),
#   one epoch of the 52-head sweep over 1.28 M rows, and the loader from 500x375 JPEGs with 16 workers.
# Scratch (weights, JPEGs, raw JSON) goes to a folder under /tmp (--scratch DIR to choose). The report
# (gpu-<device>.md, the device named, the commands) is rewritten after every step, so a kill keeps what ran; it goes
# to $OUT when OUT is set (a machine that gives back only $OUT: there the report, printed to stdout too, and one
# raw.tar.gz of the steps' JSON and stderr, nothing else), else to benchmarks/ (GPU) or the scratch folder (--cpu).
# `--cpu` runs the same steps at tiny sizes on the CPU (CI runs it through tests/gpu_check.rs, so it never rots).
#
# Time: one overall budget (540 s on a GPU, 1200 s with --cpu); each step runs under `timeout` with its share
# (the SHARE table below, seconds on an H200, x3 on the CPU) or what is left of the budget, whichever is less,
# and a step that would start with under 5 s left is not run (the report says so).
#
# Usage: scripts/gpu_check.sh [--cpu] [--scratch DIR]
# Environment: OUT (where the report and raw.tar.gz go), LMIM_BIN (the lmim-bench binary; default target/release or
# the build cache), LMIM_PYTHON (python with torch + timm; default python3), LATENTMIM_DIR / DINO_DIR (checkouts of
# yibingwei-1/LatentMIM and facebookresearch/dino, imported from, never committed; their rows are skipped without
# them), LMIM_PEAK_TFLOPS (dense bf16 peak for MFU when the device is not in benches/py/gpu_report.py's table).
# Exit: 0 when every step ran and every parity check passed, 1 otherwise (the report says which).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
SCRATCH=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --scratch) SCRATCH="$2"; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
SCRATCH="${SCRATCH:-$(mktemp -d /tmp/lmim-gpu-check.XXXXXX)}"
mkdir -p "$SCRATCH"
REPORT_DIR="${OUT:-}"
[ -n "$REPORT_DIR" ] && mkdir -p "$REPORT_DIR"
PY="${LMIM_PYTHON:-python3}"
BIN="${LMIM_BIN:-}"
if [ -z "$BIN" ]; then
    for b in "$ROOT/target/release/lmim-bench" "${CARGO_TARGET_DIR:-$HOME/.cache/lmim-bench/target}/release/lmim-bench" "${CARGO_TARGET_DIR:-$HOME/.cache/lmim-bench/target}/debug/lmim-bench"; do
        [ -x "$b" ] && { BIN="$b"; break; }
    done
fi
[ -x "$BIN" ] || { echo "gpu_check.sh: no lmim-bench binary (set LMIM_BIN)" >&2; exit 2; }
# The device tool copies at most 64 MiB per call: a binary that cannot travel is found here, not there.
BIN_BYTES=$(stat -c %s "$BIN")
if [ "$BIN_BYTES" -gt $((64 << 20)) ]; then
    echo "gpu_check.sh: $BIN is $((BIN_BYTES >> 20)) MiB, over the 64 MiB a copy to a GPU machine allows: build with --release and strip it (strip -o lmim-bench.stripped $BIN)" >&2
    [ "$MODE" = gpu ] && exit 2
fi
THREADS="$(nproc)"
# The budget's clock starts before the first Python call: `import torch` alone can take many seconds on a cold disk.
if [ "$MODE" = gpu ]; then BUDGET=540; SCALE=1; else BUDGET=1200; SCALE=3; fi
START=$SECONDS
# A binary built elsewhere runs against this machine's torch libraries (the rpath points to the build machine's):
# those of the python3 that holds torch here.
TORCH_LIB="$(timeout -k 5 60 "$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"
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

# Each step's share of the budget, in seconds on an H200 (x3 on the CPU): what it was estimated to need plus a
# margin; together 590 s of GPU-mode steps for the 540 s budget (the original code's rows run only with
# LATENTMIM_DIR / DINO_DIR; without them 480 s), so with every optional row the last step gets what is left.
declare -A SHARE=(
    [info]=15 [python-info]=25 [parity-ref]=35 [parity]=25 [step-ref-input]=10 [step-ref]=20 [step-parity]=40
    [pretrain-ours-1]=40 [pretrain-original-fp16]=40 [pretrain-original-bf16]=40 [pretrain-original-none]=40 [pretrain-ours-2]=40
    [finetune-ours]=30 [finetune-timm]=30 [infer-ours]=20 [infer-timm]=20
    [knn-ours]=30 [knn-dino]=30 [sweep-probe]=10 [sweep]=30 [synth]=25 [loader]=20 [dist-check]=15
    [dist-check-2gpu]=20 [synth-fault]=10 [device-assert]=40 [dist-fault]=60
)
FAILED=()
# The report from what ran so far (to $OUT with the raw files' tarball when OUT is set); a kill keeps it.
report() {
    "$PY" "$ROOT/benches/py/gpu_report.py" "$SCRATCH" "$ROOT" "${FAILED[*]:-}" "$REPORT_DIR" >"$SCRATCH/report.path"
    local rc=$?
    if [ -n "$REPORT_DIR" ]; then
        (cd "$SCRATCH" && tar -czf "$REPORT_DIR/raw.tar.gz.tmp" --exclude=report.path ./*.json ./*.err steps.tsv mode 2>/dev/null)
        mv -f "$REPORT_DIR/raw.tar.gz.tmp" "$REPORT_DIR/raw.tar.gz"
    fi
    return $rc
}
# step NAME CMD...: stdout to SCRATCH/NAME.json, stderr to SCRATCH/NAME.err, under `timeout` with the step's share of
# the budget (or what is left of it); a failure is recorded, not fatal.
step() {
    local name="$1"; shift
    local share=$(( ${SHARE[$name]:-30} * SCALE ))
    local left=$(( BUDGET - (SECONDS - START) ))
    local secs=$(( share < left ? share : left ))
    if [ "$secs" -lt 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" budget 0 "$*" >>"$SCRATCH/steps.tsv"
        echo "gpu_check: $name not run: the ${BUDGET} s budget is spent" >&2
        return
    fi
    local t0=$SECONDS
    # -k: a step that ignores SIGTERM (stuck in a driver call) is killed 10 s later, so the budget holds.
    timeout -k 10 "$secs" "$@" >"$SCRATCH/$name.json" 2>"$SCRATCH/$name.err"
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >>"$SCRATCH/steps.tsv"
    [ $rc -eq 0 ] || { FAILED+=("$name"); echo "gpu_check: $name failed (exit $rc, see $SCRATCH/$name.err)" >&2; }
    report >/dev/null 2>&1
}
: >"$SCRATCH/steps.tsv"
echo "$MODE" >"$SCRATCH/mode"

step info "$BIN" info
# Collectives first, so that a spent budget never leaves them out. A real process group of one (RANK=0 WORLD_SIZE=1
# with a named back-end): NCCL on the GPU, Gloo with --cpu where the build has it; all-reduce, broadcast, the
# bucketed gradient average and abort, checked for values. On a GPU the NCCL row is required: a binary without
# NCCL, or a step that did not run, fails the check. With two or more GPUs visible: a 2-rank NCCL check (P2P), and
# a 2-rank pretraining whose rank 1 is killed mid-run (every rank out in seconds, naming it).
DIST_BACKEND=$([ "$MODE" = gpu ] && echo nccl || echo gloo)
dist_missing() { printf '%s\t%s\t%s\t%s\n' "$1" missing 0 "$2" >>"$SCRATCH/steps.tsv"; FAILED+=("$1"); echo "gpu_check: $1 not run: $2" >&2; }
if "$BIN" info --json 2>/dev/null | grep -q "\"$DIST_BACKEND\""; then
    DIST_PORT=$(( 20000 + RANDOM % 20000 ))
    step dist-check env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$DIST_PORT GLOO_SOCKET_IFNAME=lo \
        "$BIN" bench --device "$DEV" --dist-backend "$DIST_BACKEND" --dist-timeout 60 dist-check
elif [ "$MODE" = gpu ]; then
    dist_missing dist-check "this binary has no NCCL (built without the CUDA headers): every multi-GPU run would fail"
fi
# A kernel's out-of-range index (LMIM_FAULT=step=1:assert: on the GPU a device-side assert, which poisons the CUDA
# context) in the one rank of a process group: the panic path (message to the store, the group aborted) must end
# the process with exit 1 and the message within a minute, not hang in the abort of a poisoned communicator.
step synth-fault "$BIN" data synth --out "$SCRATCH/fault-data" --classes 4 --train-per-class 32 --val-per-class 4 --size 64
if "$BIN" info --json 2>/dev/null | grep -q "\"$DIST_BACKEND\""; then
    device_assert() {
        local t0=$SECONDS rc
        env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(( DIST_PORT + 7 )) GLOO_SOCKET_IFNAME=lo LMIM_FAULT=step=1:assert \
            "$BIN" pretrain -q -c "$ROOT/configs/lmim_tiny.toml" --data "$SCRATCH/fault-data" -o "$SCRATCH/assert-run" --no-tensorboard \
            --dist-backend "$DIST_BACKEND" --dist-timeout 60 epochs=5 batch_size=32 micro_batch_size=16 nn_every=0 "device=\"$DEV\"" \
            2>"$SCRATCH/device-assert-run.err"
        rc=$?
        echo "{\"exit_code\": $rc, \"seconds\": $(( SECONDS - t0 ))}"
        [ "$rc" = 1 ] && grep -q "panicked" "$SCRATCH/device-assert-run.err" && [ $(( SECONDS - t0 )) -lt 60 ]
    }
    export -f device_assert; export BIN ROOT SCRATCH DIST_PORT DIST_BACKEND DEV
    step device-assert bash -c device_assert
fi
GPUS=0
[ "$MODE" = gpu ] && GPUS="$(timeout -k 5 60 "$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ "$MODE" = gpu ] && [ "${GPUS:-0}" -ge 2 ] && "$BIN" info --json 2>/dev/null | grep -q '"nccl"'; then
    DIST_PORT=$(( 20000 + RANDOM % 20000 ))
    # Two ranks, one GPU each, through plain RANK/WORLD_SIZE variables: both reports land in one file per rank.
    two_ranks() {
        local name="$1"; shift
        local pids=() r c0 c1
        for r in 0 1; do
            local fault=()
            [ "$r" = 1 ] && [ -n "${FAULT:-}" ] && fault=("LMIM_FAULT=$FAULT")
            env RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$DIST_PORT "${fault[@]}" \
                "$@" >"$SCRATCH/$name-rank$r.json" 2>"$SCRATCH/$name-rank$r.err" &
            pids+=($!)
        done
        wait "${pids[0]}"; c0=$?
        wait "${pids[1]}"; c1=$?
        echo "{\"exit_codes\": [$c0, $c1]}"
        [ "$c0" = 0 ] && [ "$c1" = 0 ]
    }
    two_ranks_check() { FAULT="" two_ranks dist-check-2gpu "$BIN" bench --device cuda --dist-backend nccl --dist-timeout 60 dist-check; }
    two_ranks_fault() {
        local t0=$SECONDS
        FAULT="step=2:die" two_ranks dist-fault "$BIN" pretrain -q -c "$ROOT/configs/lmim_tiny.toml" --data "$SCRATCH/fault-data" \
            -o "$SCRATCH/fault-run" --no-tensorboard epochs=50 batch_size=32 micro_batch_size=16 nn_every=0 'device="cuda"'
        # Rank 0 must end (exit 1) naming rank 1 within a minute of the start.
        grep -q "rank 1" "$SCRATCH/dist-fault-rank0.err" && [ $((SECONDS - t0)) -lt 60 ]
    }
    export -f two_ranks two_ranks_check two_ranks_fault; export BIN ROOT SCRATCH DIST_PORT
    step dist-check-2gpu bash -c two_ranks_check
    DIST_PORT=$(( DIST_PORT + 1 ))
    export DIST_PORT
    step dist-fault bash -c two_ranks_fault
fi
step python-info "$PY" -c "import json, torch, timm; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, 'timm': timm.__version__, 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if c else 'cpu', 'cudnn': torch.backends.cudnn.version() if c else None}))"

# Parity: timm writes its weights and outputs on this device, lmim-bench compares.
step parity-ref "$PY" "$ROOT/benches/py/gpu_side.py" parity-ref "$VIT" "$PAR_BATCH" "$DEV" "$SCRATCH/parity"
step parity "$BIN" bench --device "$DEV" parity --weights "$SCRATCH/parity/weights.safetensors" --io "$SCRATCH/parity/io.safetensors" --arch "$VIT"
# The same step against an independent one: tests/py/ref_lmim_step.py (plain PyTorch on the CPU, written from the
# method) on the weights, images and views lmim-bench draws for it.
mkdir -p "$SCRATCH/stepref"
step step-ref-input "$BIN" bench step-parity -c "$LMIM_CFG" --batch-size "$STEP_PAR_BATCH" --write-reference-input "$SCRATCH/stepref/in.safetensors"
step step-ref "$PY" "$ROOT/tests/py/ref_lmim_step.py" "$SCRATCH/stepref/in.safetensors" "$SCRATCH/stepref/out.safetensors"
step step-parity "$BIN" bench --device "$DEV" step-parity -c "$LMIM_CFG" --batch-size "$STEP_PAR_BATCH" --reference "$SCRATCH/stepref/out.safetensors"

# Pretraining step, alternating lmim-bench and the original code.
ours_pre() { step "pretrain-ours-$1" "$BIN" bench --device "$DEV" --warmup "$WARM" --steps "$STEPS" pretrain -c "$LMIM_CFG" --batch-size "$PRE_BATCH" --set "precision=$PREC"; }
orig_pre() {
    if [ -n "${LATENTMIM_DIR:-}" ]; then
        step "pretrain-original-$1" "$PY" "$ROOT/benches/py/lmim_original_step.py" "$LATENTMIM_DIR" "$ORIG_BATCH" "$STEPS" "$THREADS" "$DEV" "$1"
    fi
}
ours_pre 1
for amp in "${ORIG_AMPS[@]}"; do orig_pre "$amp"; done
ours_pre 2

# Fine-tuning step beside timm (MAE's recipe), inference beside timm.
step finetune-ours "$BIN" bench --device "$DEV" --precision "$PREC" --warmup "$WARM" --steps "$STEPS" finetune --arch "$VIT" --batch-size "$FT_BATCH"
TIMM_AMP=$([ "$MODE" = gpu ] && echo bf16 || echo none)
step finetune-timm "$PY" "$ROOT/benches/py/timm_finetune_step.py" "$VIT" "$FT_BATCH" "$STEPS" "$THREADS" "$DEV" "$TIMM_AMP"
step infer-ours "$BIN" bench --device "$DEV" --precision "$PREC" --warmup "$WARM" --steps "$STEPS" infer --arch "$VIT" --batch-size "$INF_BATCH"
step infer-timm "$PY" "$ROOT/benches/py/gpu_side.py" infer "$VIT" "$INF_BATCH" "$STEPS" "$DEV" "$TIMM_AMP"

# k-NN, the sweep, the loader.
step knn-ours "$BIN" bench --device "$DEV" knn "${KNN[@]}"
if [ -n "${DINO_DIR:-}" ]; then
    step knn-dino "$PY" "$ROOT/benches/py/gpu_side.py" knn-dino "$DINO_DIR" "${KNN[1]}" "${KNN[3]}" "${KNN[5]}" 20 "$DEV"
fi
# The sweep sized from a measurement: a probe of a tenth of the rows gives rows/s, and the timed run takes what fits
# in 60 % of its share (at most SWEEP_N).
step sweep-probe "$BIN" bench --device "$DEV" sweep --n $(( SWEEP_N / 10 )) --dim 768 --classes 1000 --set epochs=1
SWEEP_FIT=$("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(int(r["items_per_s"] * float(sys.argv[2])))' "$SCRATCH/sweep-probe.json" "$(( ${SHARE[sweep]} * SCALE * 6 / 10 ))" 2>/dev/null || echo "$SWEEP_N")
SWEEP_ROWS=$(( SWEEP_FIT < SWEEP_N ? SWEEP_FIT : SWEEP_N ))
[ "$SWEEP_ROWS" -lt 1000 ] && SWEEP_ROWS=1000
step sweep "$BIN" bench --device "$DEV" sweep --n "$SWEEP_ROWS" --dim 768 --classes 1000 --set epochs=1
step synth "$BIN" data synth --out "$SCRATCH/jpegs" "${SYNTH[@]}" --val-per-class 1 --size 500x375
step loader "$BIN" bench --steps "$LOADER_BATCHES" loader --data "$SCRATCH/jpegs" "${LOADER[@]}"

report
rc=$?
path="$(cat "$SCRATCH/report.path" 2>/dev/null)"
[ -n "$path" ] && [ -f "$path" ] && cat "$path"
echo "gpu_check: report $path; scratch $SCRATCH ($(( SECONDS - START )) s)" >&2
[ ${#FAILED[@]} -eq 0 ] && [ $rc -eq 0 ]
