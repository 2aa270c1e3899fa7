#!/usr/bin/env bash
# The embedded default, on the CPU in a few minutes: sets everything up, makes the Fashion-MNIST demo set,
# pretrains a tiny ViT with Latent MIM, evaluates it and its random initialisation with k-NN, the Latent MIM
# leave-one-out NN and the linear-probe sweep, prints the NN / LP table beside the published numbers, and draws
# the pretraining curves and the results as bars (PNG).
# LMIM_DEMO_OUT overrides the output folder (default results/demo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
cargo build --quiet --bins "${LMIM_FEATURES[@]}"
BIN="$CARGO_TARGET_DIR/debug/lmim-bench"
OUT="${LMIM_DEMO_OUT:-results/demo}"
DATA=data/fashion-mnist
mkdir -p "$OUT"

"$BIN" info
"$BIN" data prepare-demo --out "$DATA"
"$BIN" init -c configs/lmim_tiny.toml -o "$OUT/random-init.safetensors"
"$BIN" pretrain -c configs/lmim_tiny.toml --data "$DATA" -o "$OUT/pretrain"
cp "$OUT/pretrain/encoder.safetensors" "$OUT/lmim-pretrained.safetensors"
for model in random-init lmim-pretrained; do
    for protocol in knn nn-loo linear-sweep; do
        "$BIN" eval --protocol "$protocol" --checkpoint "$OUT/$model.safetensors" --data "$DATA" \
            --name "pico-$model" --output "$OUT/runs" --quiet
    done
done
"$BIN" table "$OUT/runs" -o "$OUT/table.md"
cat "$OUT/table.md"
"$BIN" plot "$OUT/pretrain" -o "$OUT/curves.png" >/dev/null
"$BIN" plot --results "$OUT/runs" -o "$OUT/bars.png" >/dev/null
echo "figures: $OUT/curves.png (pretraining curves), $OUT/bars.png (NN / k-NN / LP per model)"
