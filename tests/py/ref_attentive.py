"""Reference for the attentive probe (EP) of the probing benchmark, written here from its definition
(billpsomas/efficient-probing at b8f4fb84e8127d41aaad997d35b98c2f43f33125: poolings/ep.py with num_heads=1,
qkv_bias=False, d_out=1; probe_heads.py; util/lars.py):

    head = Sequential(EP(D, Q), BatchNorm1d(D, affine=False, eps=1e-6), Linear(D, C))
    EP(x [B, N, D]): attn = softmax((cls_token * D^-1/2) @ x^T) [B, Q, N]; v = x @ W_v^T split into Q slices of
    D/Q; query q averages slice q; the Q results side by side are [B, D].

Usage:
  ref_attentive.py train IN.safetensors OUT.safetensors
    IN: the head's tensors under the benchmark's names (0.cls_token, 0.v.weight, 2.weight, 2.bias), `tokens`
    [S, B, N, D], `labels` [S, B]; metadata `config`: {"lr": [...], "wd", "momentum", "trust"}.
    S training steps (cross entropy, LARS: for ndim > 1, g += wd * p, g *= trust * |p| / |g|; mu = m * mu + g;
    p -= lr * mu). OUT: `logits.0`, `grad.<name>` of step 0, every parameter and BN buffer after each step
    (`<name>.<s>`), `losses`, and `eval_logits` (eval mode, tokens of step 0, after the last step).
  ref_attentive.py load HEAD.safetensors TOKENS.safetensors OUT.safetensors
    Loads HEAD into the Sequential with strict=True; OUT: `logits` of `tokens` in eval mode.
"""
import json
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class EfficientProbing(torch.nn.Module):
    def __init__(self, dim, num_queries):
        super().__init__()
        self.num_queries = num_queries
        self.scale = dim ** -0.5
        self.v = torch.nn.Linear(dim, dim, bias=False)
        self.cls_token = torch.nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)

    def forward(self, x):
        b, n, d = x.shape
        q = self.num_queries
        attn = ((self.cls_token * self.scale) @ x.transpose(1, 2)).softmax(dim=-1)  # [B, Q, N]
        v = self.v(x).reshape(b, n, q, d // q).permute(0, 2, 1, 3)  # [B, Q, N, D/Q]
        return (attn.unsqueeze(2) @ v).reshape(b, d)


def make_head(dim, queries, classes):
    return torch.nn.Sequential(
        EfficientProbing(dim, queries),
        torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6),
        torch.nn.Linear(dim, classes),
    )


def train(inp, outp):
    with safe_open(inp, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    dim = t["0.v.weight"].shape[0]
    queries, classes = t["0.cls_token"].shape[1], t["2.weight"].shape[0]
    head = make_head(dim, queries, classes)
    state = head.state_dict()
    state.update({k: t[k] for k in ("0.cls_token", "0.v.weight", "2.weight", "2.bias")})
    head.load_state_dict(state, strict=True)
    head.train()
    params = dict(head.named_parameters())
    mu = {k: torch.zeros_like(p) for k, p in params.items()}
    out, losses = {}, []
    for s in range(t["tokens"].shape[0]):
        logits = head(t["tokens"][s])
        loss = F.cross_entropy(logits, t["labels"][s])
        losses.append(loss.item())
        for p in params.values():
            p.grad = None
        loss.backward()
        if s == 0:
            out["logits.0"] = logits.detach().clone()
            out.update({f"grad.{k}": p.grad.clone() for k, p in params.items()})
        with torch.no_grad():
            for k, p in params.items():
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=cfg["wd"])
                    pn, un = torch.norm(p), torch.norm(g)
                    one = torch.ones_like(pn)
                    g = g.mul(torch.where(pn > 0.0, torch.where(un > 0, cfg["trust"] * pn / un, one), one))
                mu[k].mul_(cfg["momentum"]).add_(g)
                p.add_(mu[k], alpha=-cfg["lr"][s])
        out.update({f"{k}.{s}": v.detach().clone() for k, v in head.state_dict().items() if k != "1.num_batches_tracked"})
    head.eval()
    with torch.no_grad():
        out["eval_logits"] = head(t["tokens"][0])
    out["losses"] = torch.tensor(losses)
    out["num_batches_tracked"] = head[1].num_batches_tracked.clone()
    save_file(out, outp)


def load(head_path, tokens_path, outp):
    state = load_file(head_path)
    dim = state["0.v.weight"].shape[0]
    head = make_head(dim, state["0.cls_token"].shape[1], state["2.weight"].shape[0])
    head.load_state_dict(state, strict=True)
    head.eval()
    with torch.no_grad():
        logits = head(load_file(tokens_path)["tokens"])
    save_file({"logits": logits}, outp)


if __name__ == "__main__":
    {"train": train, "load": load}[sys.argv[1]](*sys.argv[2:])
    print("ok")
