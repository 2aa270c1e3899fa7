#!/usr/bin/env bash
# Fine-tuning step of ViT-B/16 (MAE recipe: Mixup/CutMix, drop path 0.1, layer-decay AdamW) on the CPU, lmim-bench
# beside timm in one run (random images both; lmim-bench also fed by its augmentation pipeline from generated
# 500x375 JPEGs), and the 52-head linear sweep on random ViT-B-sized features. Writes benchmarks/training_cpu.md.
# FT_BATCH (8), STEPS (3), SWEEP_N (10000) override the sizes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
cargo build --quiet --bins "${LMIM_FEATURES[@]}"
BIN="$CARGO_TARGET_DIR/debug/lmim-bench"
FT_BATCH="${FT_BATCH:-8}"; STEPS="${STEPS:-3}"; SWEEP_N="${SWEEP_N:-10000}"; THREADS="$(nproc)"
TMP="$(mktemp -d)"
"$BIN" data synth --out "$TMP/synth" --classes 10 --train-per-class 8 --val-per-class 1 --size 500x375 >/dev/null
ft() { "$BIN" bench finetune --arch vit_base_patch16_224 --device cpu --batch-size "$FT_BATCH" --warmup 1 --steps "$STEPS" "$@"; }
ft -o "$TMP/ours-random-1.json"
"$LMIM_PYTHON" benches/py/timm_finetune_step.py vit_base_patch16_224 "$FT_BATCH" "$STEPS" "$THREADS" > "$TMP/timm-1.json"
ft --data "$TMP/synth" -o "$TMP/ours-data-1.json"
ft -o "$TMP/ours-random-2.json"
"$LMIM_PYTHON" benches/py/timm_finetune_step.py vit_base_patch16_224 "$FT_BATCH" "$STEPS" "$THREADS" > "$TMP/timm-2.json"
"$BIN" bench sweep --device cpu --n "$SWEEP_N" --dim 768 --classes 1000 --set epochs=1 -o "$TMP/sweep.json"
"$LMIM_PYTHON" - "$TMP" "$FT_BATCH" "$THREADS" <<'PY' > benchmarks/training_cpu.md
import json, subprocess, sys
tmp, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3]
j = lambda n: json.load(open(f"{tmp}/{n}.json"))
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
o1, o2, od, t1, t2, sw = j("ours-random-1"), j("ours-random-2"), j("ours-data-1"), j("timm-1"), j("timm-2"), j("sweep")
commit = o1["provenance"]["git_commit"][:12]
print("# Training loops on the CPU: fine-tuning step (lmim-bench vs timm) and the linear sweep\n")
print(f"Machine: {cpu}, {threads} threads, fp32, no GPU in this task. Command: `bash scripts/bench_training.sh`.")
print("Each fine-tuning side is timed twice, alternately, in one run (warm-up steps first; lmim-bench: the timed steps")
print("run as one epoch with one device read at its end, s/step = their mean; timm: the median of per-step times).")
print("Peak memory is the process's peak RSS.\n")
print(f"## Fine-tuning step, vit_base_patch16_224, batch {batch}\n")
print("| implementation | input | s/step (run 1 / run 2) | img/s (mean) | peak RSS MiB |")
print("|---|---|---|---|---|")
mean = lambda a, b, k: (a[k] + b[k]) / 2
ours = mean(o1, o2, "items_per_s"); theirs = mean(t1, t2, "img_per_s")
print(f"| lmim-bench {commit} | random images, Mixup/CutMix | {o1['s_per_step']:.2f} / {o2['s_per_step']:.2f} | {ours:.2f} | {max(o1['peak_rss_mib'], o2['peak_rss_mib']):.0f} |")
print(f"| timm {t1['timm']} (torch {t1['torch']}) | random images, timm Mixup | {t1['s_per_step']:.2f} / {t2['s_per_step']:.2f} | {theirs:.2f} | {max(t1['peak_rss_mib'], t2['peak_rss_mib']):.0f} |")
print(f"| lmim-bench {commit} | 500x375 JPEGs: decode, RRC 224, RandAugment m9, RandomErasing 0.25, Mixup/CutMix | {od['s_per_step']:.2f} | {od['items_per_s']:.2f} | {od['peak_rss_mib']:.0f} |")
print(f"\nRatio lmim-bench / timm (random images): **{ours / theirs:.2f}x** img/s.")
print("Both: drop path 0.1 (linear over blocks), global average pool, SoftTargetCrossEntropy, AdamW with MAE's layer-decay groups.\n")
d = sw["details"]
print(f"## Linear sweep, {d['heads']} heads\n")
print(f"{d['n_train']} random training rows of ViT-B size (CLS of 4 blocks + patch mean, 768-d each), {d['classes']} classes,")
print(f"{d['epochs']} epoch at batch {d['batch_size']}: **{sw['seconds']:.1f} s** ({sw['items_per_s']:.0f} rows/s through all {d['heads']} heads), peak RSS {sw['peak_rss_mib']:.0f} MiB.")
print(f"At that rate one epoch over ImageNet's 1.28 M rows takes about {1.28e6 / sw['items_per_s'] / 60:.0f} min on this CPU.")
PY
rm -rf "$TMP"
cat benchmarks/training_cpu.md
