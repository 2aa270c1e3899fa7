"""Time one training step of the ORIGINAL Latent MIM code (github.com/yibingwei-1/LatentMIM), on the CPU or a GPU.

Usage:  python benches/py/lmim_original_step.py /path/to/LatentMIM BATCH STEPS THREADS [DEVICE [AMP]]
        DEVICE: cpu (default) or cuda; AMP: none (default), fp16 (as main_lmim.py ships it: autocast + GradScaler)
        or bf16 (autocast to bfloat16, no scaler).

The checkout is only imported from (nothing from it is copied here). The model is built as `main_lmim.py` builds it
for the README pre-training command
    encoder=vit_base decoder_depth=3 avg_sim_coeff=0.1 loss=infonce_patches patch_gap=4
with every other value at its `configs/lmim.yaml` default (grid 14, patch 16, num_vis 20, tau 0.2, target_depth 12,
mask_target, avg_vis_mask_token, freeze_pe, proj mlp_dim 4096 / mlp_depth 3, no dropout / drop-path).
Input crops are 14*(16+4) = 280 px, as `main_lmim.py` sizes them.

One timed step = what `train_one_epoch` does per iteration, minus data loading, with accum_iter = 1 (so every
iteration is an optimiser step and an EMA step):
    loss, metrics = model(images, mom, sim_trg, update_ema=True)  # patchify(gap 4) + masking, EMA update of the
                                                                  # target encoder, target fwd (no_grad), encoder fwd,
                                                                  # decoder fwd, InfoNCE + avg-sim terms, 3 .item() metrics
    loss.item() + finiteness check
    loss.backward(); optimizer.step()                             # AdamW, timm weight-decay param groups
    optimizer.zero_grad()

Deviations from the GPU training loop (none patch the checkout's files):
  * AMP none: fp32, no autocast, plain backward + step (on a CPU-only run the loop's autocast and GradScaler are
    disabled no-ops anyway). AMP fp16: `torch.autocast("cuda", float16)` and a `torch.amp.GradScaler` with
    scale / unscale / step / update, as `util.misc.NativeScalerWithGradNormCount` does (no clipping: clip_grad is
    None in the reference command). AMP bf16: autocast to bfloat16 without a scaler. The `autocast(enabled=False)`
    blocks inside the attention modules are left as they are.
  * `torch.cuda.synchronize()` ends each timed iteration on CUDA, as the loop does.
  * lr / EMA-momentum / sim-target schedules are held fixed (lr 1e-4, momentum 0.996, sim_trg 0.75 = sim_init at
    epoch 0) instead of being recomputed each iteration: the recomputation is a few Python float ops.
  * No DDP, no data loader, random N(0,1) images instead of normalised ImageNet crops.
  * `args.proj` (an omegaconf node in the original) is given as a SimpleNamespace; hydra/omegaconf/wandb/submitit
    are not needed because only `models_lmim` (+ `vits`, `xvits`) is imported, never `main_lmim`.
Monkeypatching: none was needed; the model code has no hard-coded .cuda() or distributed calls.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
import warnings


def _commit_of(path):
    env = os.environ.get("LMIM_ORIGINAL_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def main():
    if len(sys.argv) not in (5, 6, 7):
        sys.exit(__doc__.split("\n\n")[1])
    repo = os.path.abspath(sys.argv[1])
    batch, steps, threads = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dev_name = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    amp = sys.argv[6] if len(sys.argv) > 6 else "none"
    if amp not in ("none", "fp16", "bf16"):
        sys.exit(f"AMP must be none, fp16 or bf16, not {amp}")

    # timm >= 1.0 warns about the deprecated import paths (timm.models.layers, timm.optim.optim_factory) and torch
    # warns about torch.cuda.amp.autocast on every attention call; keep stderr quiet.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, repo)
    from models_lmim import build_lmim  # original code
    try:
        from timm.optim import param_groups_weight_decay
    except ImportError:  # older timm, as imported by main_lmim.py
        from timm.optim.optim_factory import param_groups_weight_decay

    # Reference command + configs/lmim.yaml defaults, passed the way main_lmim.main_worker passes them.
    cfg = dict(encoder="vit_base", patch_size=16, grid_size=14, patch_gap=4, num_vis=20, decoder_depth=3,
               target_depth=12, loss="infonce_patches", tau=0.2, avg_sim_coeff=0.1, avg_vis_mask_token=True,
               mask_target=True, freeze_pe=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
               proj=types.SimpleNamespace(mlp_dim=4096, mlp_depth=3))
    lr, weight_decay, betas, momentum, sim_trg = 1e-4, 0.05, (0.9, 0.95), 0.996, 0.75
    img = cfg["grid_size"] * (cfg["patch_size"] + cfg["patch_gap"])  # 280

    torch.manual_seed(0)
    device = torch.device(dev_name)
    cuda = device.type == "cuda"
    model = build_lmim(cfg["encoder"], loss=cfg["loss"], grid_size=cfg["grid_size"], tau=cfg["tau"],
                       target_depth=cfg["target_depth"], decoder_depth=cfg["decoder_depth"],
                       patch_gap=cfg["patch_gap"], num_vis=cfg["num_vis"], avg_sim_coeff=cfg["avg_sim_coeff"],
                       avg_vis_mask_token=cfg["avg_vis_mask_token"], drop=cfg["drop"], attn_drop=cfg["attn_drop"],
                       drop_path=cfg["drop_path"], freeze_pe=cfg["freeze_pe"], proj_cfg=cfg["proj"],
                       mask_target=cfg["mask_target"]).to(device)
    model.train(True)

    # main_lmim.py: timm weight-decay groups; every parameter whose name mentions bias/norm/embed goes to the
    # no-decay group (timm also puts all 1-D params there and skips frozen ones, i.e. the target encoder).
    skip = [n for n, _ in model.named_parameters() if any(s in n for s in ("bias", "norm", "embed"))]
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
    optimizer.zero_grad()

    images = torch.randn(batch, 3, img, img, device=device)

    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def step():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, metrics = model(images, mom=momentum, sim_trg=sim_trg, update_ema=True)
        value = loss.item()
        if not (value == value and abs(value) != float("inf")):
            raise SystemExit(f"loss is {value}")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        return value

    step()  # untimed warm-up (also allocates the AdamW state)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    med = statistics.median(times)
    print(json.dumps({
        "impl": "yibingwei-1/LatentMIM",
        "commit": _commit_of(repo),
        "batch": batch,
        "steps": steps,
        "s_per_step": med,
        "img_per_s": batch / med,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "amp": amp,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
