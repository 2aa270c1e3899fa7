"""The PyTorch sides of scripts/gpu_check.sh, each printing one JSON line (or writing reference files):

  gpu_side.py parity-ref ARCH BATCH DEVICE OUT_DIR
      random timm weights of ARCH -> OUT_DIR/weights.safetensors; a random input and timm's forward_features on
      DEVICE in fp32 and under bf16 autocast (CUDA only) -> OUT_DIR/io.safetensors
  gpu_side.py infer ARCH BATCH STEPS DEVICE AMP
      timm forward_features (eval, no grad) img/s, AMP none|bf16
  gpu_side.py knn-dino DINO_DIR N_BANK N_QUERY DIM K DEVICE
      DINO's eval_knn.knn_classifier (github.com/facebookresearch/dino, imported from the checkout, nothing copied)
      on random unit features, T = 0.07, 1000 classes
"""
import json
import os
import statistics
import sys
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def info(device):
    cuda = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}


def parity_ref(arch, batch, dev, out):
    import timm
    from safetensors.torch import save_file
    device = torch.device(dev)
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0).to(device).eval()
    # timm's default init leaves biases at 0 and LayerNorm at 1/0: perturb every tensor so that all of them matter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    size = model.default_cfg["input_size"][-1]
    x = torch.randn(batch, 3, size, size, device=device)
    tensors = {"input": x.cpu()}
    with torch.no_grad():
        tensors["out_f32"] = model.forward_features(x).float().cpu()
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                tensors["out_bf16"] = model.forward_features(x).float().cpu()
    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, f"{out}/weights.safetensors", metadata={"arch": arch})
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/io.safetensors")
    print(json.dumps({"arch": arch, "batch": batch, **info(device)}))


def infer(arch, batch, steps, dev, amp):
    import timm
    device = torch.device(dev)
    model = timm.create_model(arch, num_classes=0).to(device).eval()
    size = model.default_cfg["input_size"][-1]
    x = torch.randn(batch, 3, size, size, device=device)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp == "bf16"):
        for i in range(steps + 2):
            sync(device)
            t0 = time.perf_counter()
            model.forward_features(x)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"impl": "timm", "timm": timm.__version__, "arch": arch, "batch": batch, "amp": amp, "s_per_step": med,
                      "img_per_s": batch / med, **info(device)}))


def knn_dino(repo, n_bank, n_query, dim, k, dev):
    sys.path.insert(0, os.path.abspath(repo))
    from eval_knn import knn_classifier  # DINO's code
    device = torch.device(dev)
    torch.manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, dim, device=device), dim=1)
    bank, queries = unit(n_bank), unit(n_query)
    bank_labels = torch.randint(0, 1000, (n_bank,), device=device)
    query_labels = torch.randint(0, 1000, (n_query,), device=device)
    sync(device)
    t0 = time.perf_counter()
    top1, _ = knn_classifier(bank, bank_labels, queries, query_labels, k, 0.07)
    sync(device)
    secs = time.perf_counter() - t0
    print(json.dumps({"impl": "facebookresearch/dino eval_knn.knn_classifier", "seconds": secs, "top1_random": top1,
                      "similarity_tflop": 2 * n_query * n_bank * dim / 1e12, **info(device)}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "parity-ref":
        parity_ref(args[0], int(args[1]), args[2], args[3])
    elif cmd == "infer":
        infer(args[0], int(args[1]), int(args[2]), args[3], args[4])
    elif cmd == "knn-dino":
        knn_dino(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]), args[5])
    else:
        sys.exit(__doc__)
