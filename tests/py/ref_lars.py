"""Reference for the MAE linear-probe head and LARS, written from the formulas.

Usage: ref_lars.py IN.safetensors OUT.safetensors
IN: `weight` [C, D], `bias` [C], `feats` [S, B, D], `labels` [S, B], metadata lr (list), wd, momentum, trust.
Head: BatchNorm1d(D, affine=False, eps=1e-6) (train mode, momentum 0.1) then Linear. Loss: cross entropy.
LARS (MAE util/lars.py): for ndim > 1, g += wd * p; q = trust * |p| / |g| (1 if a norm is 0); g *= q;
mu = momentum * mu + g; p -= lr * mu. Biases: plain momentum SGD.
OUT: weight/bias/running stats after each step (`weight.{s}`, `bias.{s}`, `mean.{s}`, `var.{s}`), losses.
"""
import json, sys
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

with safe_open(sys.argv[1], "pt") as f:
    meta = json.loads(f.metadata()["config"])
    T = {k: f.get_tensor(k) for k in f.keys()}
w = T["weight"].clone().requires_grad_(True)
b = T["bias"].clone().requires_grad_(True)
bn = torch.nn.BatchNorm1d(w.shape[1], affine=False, eps=1e-6)
bn.train()
mu = {"w": torch.zeros_like(w), "b": torch.zeros_like(b)}
out = {}
losses = []
for s in range(T["feats"].shape[0]):
    logits = F.linear(bn(T["feats"][s]), w, b)
    loss = F.cross_entropy(logits, T["labels"][s])
    losses.append(loss.item())
    w.grad = b.grad = None
    loss.backward()
    lr = meta["lr"][s]
    with torch.no_grad():
        for key, p in (("w", w), ("b", b)):
            g = p.grad
            if p.ndim > 1:
                g = g.add(p, alpha=meta["wd"])
                pn, un = torch.norm(p), torch.norm(g)
                one = torch.ones_like(pn)
                q = torch.where(pn > 0.0, torch.where(un > 0, meta["trust"] * pn / un, one), one)
                g = g.mul(q)
            mu[key].mul_(meta["momentum"]).add_(g)
            p.add_(mu[key], alpha=-lr)
    out[f"weight.{s}"] = w.detach().clone()
    out[f"bias.{s}"] = b.detach().clone()
    out[f"mean.{s}"] = bn.running_mean.clone()
    out[f"var.{s}"] = bn.running_var.clone()
out["losses"] = torch.tensor(losses)
save_file(out, sys.argv[2])
print("ok")
