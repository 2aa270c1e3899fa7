#!/usr/bin/env bash
# ViT forward on the CPU: lmim-bench (criterion) and PyTorch/timm in the same run, ratio into
# benchmarks/vit_forward_cpu.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$LMIM_ROOT"
threads=$(nproc)
py_before=$("$LMIM_PYTHON" benches/py/vit_forward.py "$threads")
cargo bench --bench vit_forward -- --noplot >/tmp/lmim-bench-vit.log 2>&1
py_after=$("$LMIM_PYTHON" benches/py/vit_forward.py "$threads")
"$LMIM_PYTHON" - "$CARGO_TARGET_DIR/criterion" "$py_before" "$py_after" "$threads" <<'PY' > benchmarks/vit_forward_cpu.md
import json, sys, platform, subprocess
crit, before, after, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
py = {}
for line in (before + "\n" + after).splitlines():
    r = json.loads(line)
    py.setdefault(r["model"], []).append(r)
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
print("# ViT forward on the CPU: lmim-bench vs PyTorch/timm\n")
print(f"Machine: {cpu}, {threads} threads, fp32, no grad. Command: `bash scripts/bench_vit_forward.sh`.")
print("PyTorch is timed before and after the criterion run (median of 10 batches each); the ratio uses the mean of")
print("the two PyTorch medians against criterion's median estimate.\n")
print("| model | batch | lmim-bench img/s | PyTorch img/s (before / after) | ratio lmim-bench / PyTorch |")
print("|---|---|---|---|---|")
for name, rs in py.items():
    b = rs[0]["batch"]
    est = json.load(open(f"{crit}/vit_forward_cpu/{name}/{b}/new/estimates.json"))
    ours = b / (est["median"]["point_estimate"] / 1e9)
    theirs = [r["img_per_s"] for r in rs]
    ref = sum(theirs) / len(theirs)
    print(f"| {name} | {b} | {ours:.1f} | {theirs[0]:.1f} / {theirs[-1]:.1f} | {ours / ref:.2f} |")
print(f"\ntorch {rs[0]['torch']}, timm {rs[0]['timm']}.")
PY
cat benchmarks/vit_forward_cpu.md
