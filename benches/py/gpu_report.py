"""Writes the report of scripts/gpu_check.sh from the JSON its steps left in OUT.

Usage: gpu_report.py OUT ROOT "FAILED STEP NAMES" [REPORT_DIR]
Writes REPORT_DIR/gpu-<device>.md in GPU mode, REPORT_DIR/gpu-cpu.md in CPU mode (REPORT_DIR defaults to
ROOT/benchmarks for a GPU, OUT for the CPU), atomically (a kill never leaves half a report); prints the path. Exit 1
when a parity check did not pass. The script runs it after every step, so the report always holds what ran.
"""
import json
import os
import re
import sys

# Dense (no sparsity) bf16 tensor-core peaks, from NVIDIA's data sheets (H200 / H100 SXM: 989.4 TFLOPS; A100: 312).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.05}

out, root, failed = sys.argv[1], sys.argv[2], sys.argv[3].split()
mode = open(f"{out}/mode").read().strip()
report_dir = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else (out if mode == "cpu" else f"{root}/benchmarks")


def load(name):
    try:
        with open(f"{out}/{name}.json") as f:
            return json.loads(f.read().strip().splitlines()[-1] if name.startswith(("pretrain-original", "finetune-timm", "infer-timm", "knn-dino", "python-info", "parity-ref")) else f.read())
    except (OSError, ValueError, IndexError):
        return None


pyinfo = load("python-info") or {}
device = pyinfo.get("device", "unknown")
peak = os.environ.get("LMIM_PEAK_TFLOPS")
peak = float(peak) if peak else next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
if mode == "cpu":
    peak = None
steps = [l.rstrip("\n").split("\t") for l in open(f"{out}/steps.tsv")]
lines = []
p = lines.append


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def mfu(flops, s_per_step):
    return None if (peak is None or flops is None or not s_per_step) else 100.0 * flops / s_per_step / (peak * 1e12)


title = "CPU mode (tiny sizes, what CI runs)" if mode == "cpu" else device
p(f"# GPU check: {title}\n")
p(f"Written by `scripts/gpu_check.sh{' --cpu' if mode == 'cpu' else ''}` (one call; the binary built beforehand in release mode on a CPU machine).")
p(f"Device: **{device}**; torch {pyinfo.get('torch')}, CUDA {pyinfo.get('cuda')}, cuDNN {pyinfo.get('cudnn')}, timm {pyinfo.get('timm')}.")
ours_info = open(f"{out}/info.json").read().strip() if os.path.exists(f"{out}/info.json") else ""
if ours_info:
    p("\n`lmim-bench info`:\n\n```\n" + ours_info + "\n```")
if failed:
    p(f"\n**Steps that failed:** {', '.join(failed)} (their stderr is in the run's output folder).")
budget = [row[0] for row in steps if len(row) > 1 and row[1] == "budget"]
if budget:
    p(f"\n**Steps not run (the run's time budget was spent):** {', '.join(budget)}.")

# Collectives: on a GPU the NCCL row is required; a row that did not run is a failure, never a blank.
ok = True
p("\n## Collectives\n")
p("| check | result |\n|---|---|")
ran = {row[0]: row for row in steps if len(row) > 1}
for name, what in [("dist-check", "process group of one: all-reduce, broadcast, bucketed gradient average, abort"),
                   ("device-assert", "an index out of range in a kernel (a device-side assert on the GPU) in a process group of one: exit 1 with the panic's message within a minute"),
                   ("dist-check-2gpu", "2 ranks on 2 GPUs through NCCL (P2P), the same checks"),
                   ("dist-fault", "2-rank pretraining, rank 1 killed mid-run: rank 0 out within a minute naming it")]:
    row = ran.get(name)
    if row is None:
        if name in ("dist-check", "device-assert") and mode == "gpu":
            p(f"| {what} | **FAILED: not run** |")
            ok = False
        elif name not in ("dist-check", "device-assert"):
            p(f"| {what} | not run (fewer than 2 GPUs visible) |" if mode == "gpu" else f"| {what} | not run (CPU mode) |")
        continue
    if row[1] == "missing":
        p(f"| {what} | **FAILED: not run: {row[3]}** |")
        ok = False
        continue
    r = load(name)
    passed = row[1] == "0" and (name != "dist-check" or bool(r and r.get("pass")))
    detail = f"{r.get('backend')} x {r.get('world_size')}, max errors {r.get('all_reduce_max_err')}/{r.get('broadcast_max_err')}/{r.get('gradient_average_max_err')}" if name == "dist-check" and r else f"exit {row[1]} after {row[2]} s"
    p(f"| {what} | {'pass' if passed else '**FAILED**'} ({detail}) |")
    ok &= passed

# Parity.
p("\n## Parity\n")
p("| check | max abs diff | mean abs diff | tolerance | pass |\n|---|---|---|---|---|")
par = load("parity")
if par:
    f = par["f32"]
    p(f"| {par['arch']} forward_features fp32 vs timm, same device, batch {par['batch']} | {f['max_abs']:.2e} | {f['mean_abs']:.2e} | max {f['tolerance_max']:g} | {f['max_abs'] <= f['tolerance_max']} |")
    if "bf16" in par:
        b = par["bf16"]
        p(f"| same, bf16 autocast vs timm's bf16 autocast | {b['max_abs']:.2e} | {b['mean_abs']:.2e} | max {b['tolerance_max']:g}, mean {b['tolerance_mean']:g} | {b['max_abs'] <= b['tolerance_max'] and b['mean_abs'] <= b['tolerance_mean']} |")
    ok &= bool(par["pass"])
else:
    ok = False
sp = load("step-parity")
if sp:
    p(f"| one Latent MIM step ({sp['encoder']}, batch {sp['batch']}, fp32) on {sp['device']} vs the CPU: loss | {abs(sp['loss_cpu'] - sp['loss_device']):.2e} | - | rel {sp['tolerance_rel']:g} (rel diff {sp['loss_rel_diff']:.2e}) | {sp['loss_rel_diff'] <= sp['tolerance_rel']} |")
    p(f"| same: every gradient and the EMA'd target, max abs diff / max abs value | {sp['max_rel_diff_grads_and_target']:.2e} (`{sp['worst_tensor']}`) | - | rel {sp['tolerance_rel']:g} | {sp['pass']} |")
    ref = sp.get("pytorch_reference")
    if ref:
        p(f"| same step on {sp['device']} vs an independent PyTorch step (tests/py/ref_lmim_step.py, CPU fp32): loss | {abs(ref['loss'] - sp['loss_device']):.2e} | - | rel {sp['tolerance_rel']:g} (rel diff {ref['loss_rel_diff']:.2e}) | {ref['loss_rel_diff'] <= sp['tolerance_rel']} |")
        p(f"| same: {ref['gradients']} gradients, max abs diff / max abs reference value | {ref['max_rel_diff_grads']:.2e} (`{ref['worst_tensor']}`) | - | rel {sp['tolerance_rel']:g} | {ref['pass']} |")
    else:
        p("| the PyTorch reference step did not run (steps step-ref-input, step-ref) | - | - | - | False |")
        ok = False
    ok &= bool(sp["pass"])
else:
    ok = False
if sp and "batch_copy" in sp:
    p(f"\nThe step's batch reached {sp['device']} through run_epoch's copy ahead, on the **{sp['batch_copy']}**.")
if par:
    p(f"\nSDPA kernel libtorch picks for ViT attention on this device: fp32 **{par['sdpa_f32']}**, bf16 **{par['sdpa_bf16']}**.")

# Pretraining.
p("\n## Latent MIM pretraining step, ViT-B/16 recipe (`configs/lmim_vit_base.toml`)\n" if mode == "gpu" else "\n## Latent MIM pretraining step (`configs/lmim_tiny.toml`)\n")
p("Random images on the device, one optimiser step per iteration; run in the order listed (ours, original fp16, original bf16, ours).")
p(f"MFU: counted FLOPs of the step (matrix products of both encoders, decoder, projector and loss; 3x where backward runs) over the step time, against {fmt(peak, 'g')} TFLOPS dense bf16.\n")
p("| implementation | precision | batch | s/step | img/s | peak CUDA MiB | MFU % |\n|---|---|---|---|---|---|---|")
ours = [load("pretrain-ours-1"), load("pretrain-ours-2")]
flops = next((o["details"]["flops_per_step"] for o in ours if o), None)
for i, o in enumerate(ours):
    if o:
        p(f"| lmim-bench {o['provenance']['git_commit'][:12]} (run {i + 1}) | {o['precision']} | {o['batch']} | {o['s_per_step']:.3f} | {o['items_per_s']:.1f} | {fmt(o['details'].get('cuda_peak_mib'), '.0f')} | {fmt(mfu(flops, o['s_per_step']))} |")
orig = {}
for amp in ("fp16", "bf16", "none"):
    o = load(f"pretrain-original-{amp}")
    if o:
        orig[amp] = o
        scale = {"fp16": "fp16 + GradScaler (as shipped)", "bf16": "bf16 autocast", "none": "f32"}[amp]
        # Same model: its FLOPs per image are ours, scaled to its batch.
        f = flops * o["batch"] / ours[0]["batch"] if (flops and ours[0]) else None
        p(f"| yibingwei-1/LatentMIM {(o.get('commit') or '?')[:12]} | {scale} | {o['batch']} | {o['s_per_step']:.3f} | {o['img_per_s']:.1f} | {fmt(o.get('cuda_peak_mib'), '.0f')} | {fmt(mfu(f, o['s_per_step']))} |")
if not orig:
    p("| yibingwei-1/LatentMIM | - | - | - | - | - | not run: LATENTMIM_DIR was not set |")
if flops:
    p(f"\nCounted FLOPs per step at batch {ours[0]['batch'] if ours[0] else '?'}: {flops / 1e12:.2f} TFLOP.")
ours_ips = [o["items_per_s"] for o in ours if o]
base = "fp16" if "fp16" in orig else "none" if "none" in orig else None
if ours_ips and base and ours[0] and ours[0]["batch"] == orig[base]["batch"]:
    ratio = (sum(ours_ips) / len(ours_ips)) / orig[base]["img_per_s"]
    p(f"Ratio lmim-bench / original ({'fp16 as shipped' if base == 'fp16' else 'f32'}): **{ratio:.2f}x** (goal >= 1.25x: {'met' if ratio >= 1.25 else 'not met'}).")
elif orig:
    p("The original code ran the ViT-B/16 recipe at another batch than lmim-bench's tiny config here, so no ratio is given.")
if ours_ips and peak and flops:
    best = max(mfu(flops, o["s_per_step"]) for o in ours if o)
    p(f"MFU of lmim-bench: **{best:.1f} %** (goal >= 45 %: {'met' if best >= 45 else 'not met'}).")

# Fine-tuning and inference.
p("\n## Fine-tuning step (MAE recipe: Mixup/CutMix, drop path 0.1, layer-decay AdamW) and inference\n")
p("| what | implementation | precision | batch | s/step | img/s | peak CUDA MiB |\n|---|---|---|---|---|---|---|")
ft = load("finetune-ours")
if ft:
    p(f"| fine-tuning {ft['arch']} | lmim-bench | {ft['precision']} | {ft['batch']} | {ft['s_per_step']:.3f} | {ft['items_per_s']:.1f} | {fmt(ft['details'].get('cuda_peak_mib'), '.0f')} |")
for name in ("finetune-timm", "finetune-timm-fp16"):
    t = load(name)
    if t:
        p(f"| fine-tuning {t['arch']} | timm {t['timm']} | {t['amp']} | {t['batch']} | {t['s_per_step']:.3f} | {t['img_per_s']:.1f} | {fmt(t.get('cuda_peak_mib'), '.0f')} |")
inf = load("infer-ours")
if inf:
    p(f"| inference {inf['arch']} | lmim-bench | {inf['precision']} | {inf['batch']} | {inf['s_per_step']:.4f} | {inf['items_per_s']:.1f} | {fmt(inf['details'].get('cuda_peak_mib'), '.0f')} |")
ti = load("infer-timm")
if ti:
    p(f"| inference {ti['arch']} | timm {ti['timm']} | {ti['amp']} | {ti['batch']} | {ti['s_per_step']:.4f} | {ti['img_per_s']:.1f} | {fmt(ti.get('cuda_peak_mib'), '.0f')} |")
tt = load("finetune-timm")
if ft and tt:
    p(f"\nFine-tuning ratio lmim-bench / timm (same precision): **{ft['items_per_s'] / tt['img_per_s']:.2f}x**.")
if inf and ti:
    p(f"Inference ratio lmim-bench / timm: **{inf['items_per_s'] / ti['img_per_s']:.2f}x**.")

# k-NN, sweep, loader.
p("\n## k-NN, linear sweep, loader\n")
k = load("knn-ours")
if k:
    d = k["details"]
    p(f"- k-NN (weighted, k = {d['k']}, T = 0.07) of {d['n_query']} x {d['n_bank']} x {d['dim']} random fp32 features ({d['similarity_tflop']:.1f} TFLOP of products): **{k['seconds']:.2f} s** ({d['tflops_per_s']:.1f} TFLOP/s, {d['backend']}).")
kd = load("knn-dino")
if kd:
    p(f"- DINO's `knn_classifier` on the same sizes: **{kd['seconds']:.2f} s**.")
elif mode == "gpu":
    p("- DINO's `knn_classifier`: not run (DINO_DIR was not set).")
sw = load("sweep")
if sw:
    d = sw["details"]
    p(f"- 52-head linear sweep, one epoch over {d['n_train']} cached rows ({d['dim']}-d x 5 inputs, {d['classes']} classes): **{sw['seconds']:.1f} s** ({sw['items_per_s']:.0f} rows/s).")
ld = load("loader")
if ld:
    d = ld["details"]
    p(f"- Loader, {d['train_images']} generated 500x375 JPEGs -> batches of {ld['batch']} x 3 x {d['size']} x {d['size']} ({d['transform']}), {d['workers']} workers: **{ld['items_per_s']:.0f} img/s**.")
    if ours_ips:
        p(f"  The pretraining step consumes {max(ours_ips):.0f} img/s: the loader {'keeps up' if ld['items_per_s'] >= max(ours_ips) else 'does NOT keep up'} on this machine's {os.cpu_count()} cores.")

p("\n## Commands\n")
p("| step | exit | seconds | command |\n|---|---|---|---|")
for name, rc, secs, cmd in steps:
    cmd = re.sub(r"/\S*/(lmim-bench|python3?|benches/py/\S+|configs/\S+)", r"\1", cmd)
    p(f"| {name} | {rc} | {secs} | `{cmd}` |")

slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"
path = f"{report_dir}/gpu-cpu.md" if mode == "cpu" else f"{report_dir}/gpu-{slug}.md"
with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
os.replace(path + ".tmp", path)
# A report written before the device was known (python-info not run yet) is named gpu-unknown.md: gone once the
# device has a name, so $OUT holds one report.
stale = f"{report_dir}/gpu-unknown.md"
if path != stale and os.path.exists(stale):
    os.remove(stale)
print(path)
sys.exit(0 if ok else 1)
