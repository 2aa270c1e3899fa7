#!/usr/bin/env bash
# The committed results on the Fashion-MNIST demo set (results/fashion-mnist/): the demo's tiny Latent MIM
# pretraining, then all protocols on the pretrained encoder and on its random initialisation: k-NN and the probing
# benchmark's k-NN sweep, the leave-one-out NN, the linear-probe sweep, the MAE linear probe, the benchmark's
# attentive probe (EP), DINO's DAVIS label propagation on a generated video set (a few seconds), CAPI's ADE20K
# segmentation probes on a generated set, MSN's low-shot logistic regression and MAE fine-tuning (budgets shortened
# for a 5 000-image train split on 2 CPU cores; the overrides are in each record), and the table.
# About 25 minutes on 2 cores. LMIM_RESULTS_OUT overrides the output folder. The evaluations are `lmim-bench suite
# suites/demo.toml` once per checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
# LMIM_BIN: a binary built beforehand (a copy keeps a long run safe from rebuilds of the tree meanwhile).
if [[ -n "${LMIM_BIN:-}" ]]; then
    BIN="$LMIM_BIN"
else
    cargo build --quiet --bins "${LMIM_FEATURES[@]}"
    BIN="$CARGO_TARGET_DIR/debug/lmim-bench"
fi
OUT="${LMIM_RESULTS_OUT:-results/fashion-mnist}"
DATA=data/fashion-mnist
WORK=results/runs/fashion-mnist-work
# A fresh results folder: records of earlier runs (other protocol versions) would share the table.
rm -rf "$OUT" "$WORK"
mkdir -p "$OUT" "$WORK"

"$BIN" data prepare-demo --out "$DATA"
"$BIN" init -c configs/lmim_tiny.toml -o "$WORK/random-init.safetensors"
"$BIN" pretrain -q -c configs/lmim_tiny.toml --data "$DATA" -o "$WORK/pretrain"
# Short generated videos in the DAVIS-2017 layout for the region-level protocol (no DAVIS download in the demo).
"$BIN" data synth-davis --out data/synth-davis --sequences 3 --frames 8 --size 160x72
# And a generated ADE20K-layout set for CAPI's segmentation probes (a run-through: its textures are easy).
"$BIN" data synth-ade20k --out data/synth-ade20k
cp "$WORK/pretrain/encoder.safetensors" "$WORK/lmim-pretrained.safetensors"
cp "$WORK/pretrain/config.toml" "$OUT/pretrain-config.toml"
cp "$WORK/pretrain/metrics.jsonl" "$OUT/pretrain-metrics.jsonl"

# Every protocol, on the pretrained encoder and on its random initialisation: one suite (suites/demo.toml holds the
# shortened LP, EP and Ft budgets of a 5 000-image train split, and why).
for model in random-init lmim-pretrained; do
    "$BIN" suite suites/demo.toml --checkpoint "$WORK/$model.safetensors" --name "pico-$model" --output "$OUT" --quiet \
        --data demo="$DATA" --data davis=data/synth-davis --data ade20k=data/synth-ade20k
done
# Run folders hold weights; the records, metrics and configs stay.
for d in "$OUT"/*-finetune-*/ "$OUT"/*-attentive-*/; do
    rm -f "$d"/*.safetensors
done
rm -rf "$OUT"/*-davis-*/masks
"$BIN" table "$OUT" -o "$OUT/table.md"
"$BIN" plot "$WORK/pretrain" -o "$OUT/curves.png"
"$BIN" plot --results "$OUT" -o "$OUT/bars.png"
cat "$OUT/table.md"
