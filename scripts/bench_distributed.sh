#!/usr/bin/env bash
# Data-parallel costs on this machine's CPU, side by side in one run, written to benchmarks/distributed_cpu.md:
# the Gloo all-reduce of ViT-B/16's gradients between 2 local processes, and the Latent MIM step of a small ViT at
# world 1 and world 2 (one torch thread per process, as the tests run them; world 1 with 2 threads beside it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
cargo build --quiet --release --bins "${LMIM_FEATURES[@]}"
BIN="$CARGO_TARGET_DIR/release/lmim-bench"
OUT=benchmarks/distributed_cpu.md
TMP=$(mktemp -d)
export GLOO_SOCKET_IFNAME=lo
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
world2() {  # world2 OUTFILE ARGS...: the same bench as 2 ranks; rank 0 writes the JSON
    local out=$1; shift
    local p; p=$(port)
    RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$p OMP_NUM_THREADS=1 "$BIN" bench "$@" -o /dev/null &
    RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$p OMP_NUM_THREADS=1 "$BIN" bench "$@" -o "$out"
    wait
}
STEP=(pretrain -c configs/lmim_tiny.toml --device cpu --batch-size 32 --warmup 3 --steps 20)
world2 "$TMP/ar.json" allreduce --arch vit_base_patch16_224 --device cpu --warmup 2 --steps 10
OMP_NUM_THREADS=1 "$BIN" bench "${STEP[@]}" -o "$TMP/w1t1.json"
OMP_NUM_THREADS=2 "$BIN" bench "${STEP[@]}" -o "$TMP/w1t2.json"
world2 "$TMP/w2.json" "${STEP[@]}"
python3 - "$TMP" "$OUT" "$(nproc)" "$(lscpu | sed -n 's/^Model name: *//p')" <<'PY'
import json, sys, datetime
tmp, out, cores, cpu = sys.argv[1:]
j = lambda n: json.load(open(f"{tmp}/{n}.json"))
ar, a, b, c = j("ar"), j("w1t1"), j("w1t2"), j("w2")
d = ar["details"]
lines = [
    "# Data parallel on the CPU (Gloo, 2 local processes)",
    "",
    f"Machine: {cpu}, {cores} cores; {datetime.date.today()}; `bash scripts/bench_distributed.sh` (release build).",
    "",
    "## Gradient all-reduce of ViT-B/16 (`bench allreduce`)",
    "",
    f"{d['gradients']:,} f32 gradients ({d['megabytes']:.0f} MB, {d['tensors']} tensors) in 25 MB buckets, all in flight at once, "
    f"then divided by the world size: **{ar['s_per_step']:.3f} s** per all-reduce, bus bandwidth {d['bus_gb_per_s']:.2f} GB/s "
    f"(world {d['world']['world_size']}, {d['world']['backend']}).",
    "",
    "## Latent MIM step, world 1 vs world 2 (`bench pretrain`, configs/lmim_tiny.toml, 32 images per process)",
    "",
    "| run | s / step | images / s (all processes) | ratio to world 1, 1 thread |",
    "|---|---|---|---|",
]
base = a["items_per_s"]
for name, r, imgs in [("world 1, 1 thread", a, a["items_per_s"]), ("world 1, 2 threads", b, b["items_per_s"]), ("world 2, 1 thread each", c, 2 * c["items_per_s"])]:
    lines.append(f"| {name} | {r['s_per_step']:.3f} | {imgs:.1f} | {imgs / base:.2f}x |")
lines += ["", "World 2 images/s count both ranks (each rank's step includes the gradient all-reduce of the tiny model)."]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
rm -rf "$TMP"
