"""Reference of one Latent MIM training step, written from the method description (yibingwei-1/LatentMIM, the Latent MIM paper) in plain PyTorch.

Usage: ref_lmim_step.py IN.safetensors OUT.safetensors
IN holds the model weights under lmim-bench's names (encoder.*, target_encoder.*, decoder.*; timm-style ViT names,
conv patch embedding), the inputs `images`, `oy`, `ox` (patch offsets) and `ids` (a permutation per image: first
num_vis are visible), and scalars in the metadata. OUT holds the loss terms, the gradient of every trainable tensor
(`grad.<name>`), the weights after one AdamW step (`adamw.<name>`) and the target after an EMA update (`ema.<name>`).
"""
import json, math, sys
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

inp, outp = sys.argv[1], sys.argv[2]
with safe_open(inp, "pt") as f:
    meta = f.metadata()
    T = {k: f.get_tensor(k) for k in f.keys()}
cfg = json.loads(meta["config"])
P, GAP, NV = cfg["patch"], cfg["gap"], cfg["num_vis"]
TAU, COEF, S_T = cfg["tau"], cfg["avg_sim_coeff"], cfg["sim_target"]
torch.set_default_dtype(torch.float32)

params = {k: v.clone().requires_grad_(True) for k, v in T.items()
          if (k.startswith("encoder.") or k.startswith("decoder.")) and not k.endswith("pos_embed")}
W = lambda k: params[k] if k in params else T[k]


def ln(x, pre, eps):
    return F.layer_norm(x, x.shape[-1:], W(pre + ".weight"), W(pre + ".bias"), eps)


def lin(x, pre, bias=True):
    return F.linear(x, W(pre + ".weight"), W(pre + ".bias") if bias else None)


def attn_heads(x, h):
    B, N, D = x.shape
    return x.reshape(B, N, h, D // h).transpose(1, 2)


def softmax_attn(q, k, v):
    a = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return a.softmax(-1) @ v


def encoder(pre, pix, pid, heads, depth, dim):
    # Linear patch embedding on (channel, row, col) flattened patches == the conv weight viewed as [D, C*p*p].
    x = F.linear(pix, W(pre + "patch_embed.proj.weight").reshape(dim, -1), W(pre + "patch_embed.proj.bias"))
    pe = T[pre + "pos_embed"][0]
    x = x + pe[1:][pid]
    cls = W(pre + "cls_token").expand(x.shape[0], -1, -1) + pe[0]
    x = torch.cat([cls, x], 1)
    for i in range(depth):
        b = f"{pre}blocks.{i}."
        h = ln(x, b + "norm1", 1e-6)
        B, N, D = h.shape
        qkv = lin(h, b + "attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        o = softmax_attn(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, D)
        x = x + lin(o, b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    x = ln(x, pre + "norm", 1e-6)
    nh = cfg["proj_depth"]
    for i in range(nh):  # projection head: Linear (no bias) -> LN(eps 1e-5) -> GELU, last without GELU
        x = ln(lin(x, f"{pre}head.linear{i}", bias=False), f"{pre}head.norm{i}", 1e-5)
        if i < nh - 1:
            x = F.gelu(x)
    return x


def decoder(z_vis, vis_pid, mask_pid):
    pre = "decoder."
    pe = T[pre + "pos_embed"]
    D = pe.shape[1]
    x = lin(z_vis, pre + "embed")
    pv, pm = pe[vis_pid + 1], pe[mask_pid + 1]
    w = (pm @ pv.transpose(1, 2) / math.sqrt(D)).softmax(-1)
    m = W(pre + "mask_token").expand(mask_pid.shape[0], mask_pid.shape[1], -1) + w @ x[:, 1:]
    q = torch.cat([W(pre + "cls_token").expand(x.shape[0], -1, -1), m], 1)
    x = x + torch.cat([pe[:1].expand(x.shape[0], 1, D), pv], 1)
    q = q + torch.cat([pe[:1].expand(x.shape[0], 1, D), pm], 1)
    h = cfg["dec_heads"]
    for i in range(cfg["dec_depth"]):
        b = f"{pre}blocks.{i}."
        t = ln(q, b + "norm1", 1e-6)
        B, N, _ = t.shape
        qkv = lin(t, b + "self_attn.qkv").reshape(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
        q = q + lin(softmax_attn(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, D), b + "self_attn.proj")
        qq = attn_heads(lin(ln(q, b + "norm2q", 1e-6), b + "cross_attn.q_proj"), h)
        kv = lin(ln(x, b + "norm2kv", 1e-6), b + "cross_attn.kv_proj")
        M = kv.shape[1]
        kv = kv.reshape(B, M, 2, h, D // h).permute(2, 0, 3, 1, 4)
        q = q + lin(softmax_attn(qq, kv[0], kv[1]).transpose(1, 2).reshape(B, N, D), b + "cross_attn.proj")
        q = q + lin(F.gelu(lin(ln(q, b + "norm3", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    return lin(ln(q, pre + "norm", 1e-6), pre + "head")[:, 1:]


def avgsim(z):
    z = F.normalize(z, dim=-1)
    return (z @ z.transpose(1, 2)).mean()


# Patchify with gap: the window of cell (r, c) starts at (r*(P+GAP)+oy, c*(P+GAP)+ox); flattened (c, row, col).
img, oy, ox, ids = T["images"], T["oy"], T["ox"], T["ids"]
B, C, H, _ = img.shape
G = H // (P + GAP)
patches = torch.empty(B, G * G, C * P * P)
for b in range(B):
    for r in range(G):
        for c in range(G):
            y0, x0 = r * (P + GAP) + int(oy[b, r, c]), c * (P + GAP) + int(ox[b, r, c])
            patches[b, r * G + c] = img[b, :, y0:y0 + P, x0:x0 + P].reshape(-1)
vis_pid, mask_pid = ids[:, :NV], ids[:, NV:]
gather = lambda x, pid: torch.gather(x, 1, pid[..., None].expand(-1, -1, x.shape[-1]))

dim, depth, heads = cfg["dim"], cfg["depth"], cfg["heads"]
with torch.no_grad():
    z_trg = encoder("target_encoder.", gather(patches, mask_pid), mask_pid, heads, depth, dim)[:, 1:]
z_vis = encoder("encoder.", gather(patches, vis_pid), vis_pid, heads, depth, dim)
z_pred = decoder(z_vis, vis_pid, mask_pid)

# infonce_patches
pred = (z_pred - z_pred.mean(1, keepdim=True)) / (z_pred.std(1, keepdim=True) + 1e-4)
pred, trg = F.normalize(pred, dim=-1), F.normalize(z_trg, dim=-1)
logits = pred @ trg.transpose(1, 2) / TAU
N = logits.shape[1]
nce = F.cross_entropy(logits.reshape(B * N, N), torch.arange(N).repeat(B)) * 2 * TAU
sp, sv = avgsim(z_pred), avgsim(z_vis[:, 1:])
reg = COEF * (sp - S_T) ** 2 + COEF * (sv - S_T) ** 2
loss = nce + reg
loss.backward()

out = {"loss": loss.detach().reshape(1), "loss_nce": nce.detach().reshape(1), "loss_reg": reg.detach().reshape(1),
       "avg_sim_pred": sp.detach().reshape(1), "avg_sim_vis": sv.detach().reshape(1), "avg_sim_trg": avgsim(z_trg).reshape(1)}
for k, p in params.items():
    out["grad." + k] = p.grad.contiguous()

# One AdamW step with the reference's groups: no decay for ndim <= 1 or names with bias / norm / embed.
decay = [p for k, p in params.items() if not (p.ndim <= 1 or "bias" in k or "norm" in k or "embed" in k)]
no_decay = [p for k, p in params.items() if (p.ndim <= 1 or "bias" in k or "norm" in k or "embed" in k)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["wd"]}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=cfg["lr"], betas=(0.9, 0.95), foreach=False)
opt.step()
for k, p in params.items():
    out["adamw." + k] = p.detach().contiguous()

# EMA of the target towards the updated encoder.
m = cfg["momentum"]
with torch.no_grad():
    for k, p in params.items():
        if k.startswith("encoder."):
            t = T["target_" + k].clone()
            t.mul_(m).add_((1 - m) * p.detach())
            out["ema.target_" + k] = t
save_file(out, outp)
print("ok")
