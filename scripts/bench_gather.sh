#!/usr/bin/env bash
# Peak memory of every rank when a split's features are gathered to rank 0 between 2 local processes (Gloo),
# as `extract` does after each rank extracted its block: `protocols::extract::gather_rows` (chunks of 16384 rows,
# rank 0 alone holds the matrix) side by side with an all-reduce of the full zero-padded matrix on every rank, in
# one run, written to benchmarks/extract_gather_cpu.md. N and DIM default to a 400k x 768 f32 matrix (1.1 GiB).
#
#     bash scripts/bench_gather.sh [N] [DIM]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
N=${1:-400000}
DIM=${2:-768}
cargo build --quiet --bins
BIN="$CARGO_TARGET_DIR/debug/lmim-bench"
OUT=benchmarks/extract_gather_cpu.md
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
CORES=$(nproc)
export GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
world() {  # world SIZE OUTFILE ARGS...: rank 0 writes the JSON
    local size=$1 out=$2; shift 2
    local p; p=$(port)
    for ((r = size - 1; r > 0; r--)); do
        RANK=$r WORLD_SIZE=$size LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$p "$BIN" bench gather "$@" --device cpu -o /dev/null &
    done
    RANK=0 WORLD_SIZE=$size LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$p "$BIN" bench gather "$@" --device cpu -o "$out"
    wait
}
"$BIN" bench gather --n "$N" --dim "$DIM" --device cpu -o "$TMP/w1.json"
world 2 "$TMP/chunked.json" --n "$N" --dim "$DIM"
world 2 "$TMP/naive.json" --n "$N" --dim "$DIM" --naive
python3 - "$TMP" "$OUT" "$CORES" "$(lscpu | sed -n 's/^Model name: *//p')" <<'PY'
import json, sys, datetime
tmp, out, cores, cpu = sys.argv[1:]
j = lambda n: json.load(open(f"{tmp}/{n}.json"))
one, ch, nv = j("w1"), j("chunked"), j("naive")
d = ch["details"]
lines = [
    "# Gathering a split's features to rank 0 (`extract` on 2 ranks, CPU, Gloo)",
    "",
    f"Machine: {cpu}, {cores} cores; {datetime.date.today()}; `bash scripts/bench_gather.sh {d['n']} {d['dim']}` (dev build; "
    "`lmim-bench bench gather`, random features, each rank holding its contiguous block of the split as `extract` leaves it).",
    "",
    f"Matrix: {d['n']:,} x {d['dim']} f32 = **{d['matrix_mib']:.0f} MiB** (ImageNet's train split at ViT-B width is 1,281,167 x 768 = 3,753 MiB).",
    "",
    "| how | world | peak RSS rank 0 (MiB) | peak RSS rank 1 (MiB) | above the process's own block, rank 1 (MiB) | seconds |",
    "|---|---|---|---|---|---|",
]
def row(name, r):
    dd = r["details"]
    p, b = dd["peak_rss_mib_per_rank"], dd["peak_rss_before_mib_per_rank"]
    r1 = f"{p[1]:.0f}" if len(p) > 1 else "-"
    extra = f"{p[1] - b[1]:.0f}" if len(p) > 1 else "-"
    return f"| {name} | {dd['world']['world_size']} | {p[0]:.0f} | {r1} | {extra} | {r['seconds']:.2f} |"
lines += [row("one process (no gather)", one), row(f"gather_rows, chunks of {d['chunk_rows']} rows to rank 0", ch), row("all-reduce of the full matrix (every rank holds it)", nv)]
p_ch, p_nv = ch["details"]["peak_rss_mib_per_rank"], nv["details"]["peak_rss_mib_per_rank"]
lines += [
    "",
    f"Rank 1's peak with `gather_rows` is {p_ch[1] / p_nv[1]:.2f}x that of the all-reduce ({p_ch[1]:.0f} vs {p_nv[1]:.0f} MiB); "
    f"rank 0's is {p_ch[0] / p_nv[0]:.2f}x. With 8 ranks on one node the all-reduce would hold 8 copies of the matrix "
    "(30 GB for ImageNet's train features); `gather_rows` holds one, on rank 0, plus at most world x chunk rows in flight.",
]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
