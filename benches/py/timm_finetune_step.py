"""One fine-tuning step of timm's ViT as MAE's main_finetune.py runs it, for comparison with `lmim-bench bench
finetune` on the same machine: random images, timm Mixup/CutMix (0.8 / 1.0, label smoothing 0.1), global-pool
ViT with drop path 0.1, SoftTargetCrossEntropy, AdamW with layer-wise lr decay 0.65 groups, fp32 on the CPU.

Usage: timm_finetune_step.py ARCH BATCH STEPS THREADS [DEVICE [AMP]]  ->  one JSON line (median s/step over STEPS
after 1 warm-up). DEVICE cpu (default) or cuda; AMP none (default), fp16 (MAE's main_finetune.py: autocast +
GradScaler) or bf16 (autocast, no scaler).
"""
import json, resource, statistics, sys, time

import torch
import timm
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

arch, batch, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
device = torch.device(sys.argv[5] if len(sys.argv) > 5 else "cpu")
amp = sys.argv[6] if len(sys.argv) > 6 else "none"
cuda = device.type == "cuda"
torch.set_num_threads(threads)
torch.manual_seed(0)
model = timm.create_model(arch, num_classes=1000, drop_path_rate=0.1, global_pool="avg").to(device)
model.train()
depth = len(model.blocks)


def layer_id(name):
    # MAE's util/lr_decay.py: embeddings are layer 0, block i is i + 1, the rest (norms, head) the last layer.
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


groups = {}
for n, p in model.named_parameters():
    decay = not (p.ndim == 1 or n in ("cls_token", "pos_embed"))
    lid = layer_id(n)
    key = (lid, decay)
    g = groups.setdefault(key, {"params": [], "weight_decay": 0.05 if decay else 0.0, "lr": 1e-4 * 0.65 ** (depth + 1 - lid)})
    g["params"].append(p)
opt = torch.optim.AdamW(list(groups.values()), lr=1e-4, betas=(0.9, 0.999))
mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=1000)
crit = SoftTargetCrossEntropy()
size = model.default_cfg["input_size"][-1]
x = torch.randn(batch, 3, size, size, device=device)
y = torch.randint(0, 1000, (batch,), device=device)
amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None


def step():
    xm, t = mix(x.clone(), y)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = crit(model(xm), t)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    opt.zero_grad()
    if cuda:
        torch.cuda.synchronize()


step()
if cuda:
    torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(json.dumps({"impl": "timm", "arch": arch, "batch": batch, "steps": steps, "s_per_step": med, "img_per_s": batch / med,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads(),
                  "device": torch.cuda.get_device_name() if cuda else "cpu", "amp": amp,
                  "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                  "torch": torch.__version__, "timm": timm.__version__}))
