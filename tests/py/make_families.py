"""Checkpoints in the layouts of other methods' training code, for tests/checkpoint_families.rs.

Usage: make_families.py OUT_DIR

For each case NAME, a small timm ViT with random weights is saved the way that method's code saves it (same
nesting, prefixes, extra sub-models, heads, optimiser state and metadata; the layouts are described in
src/checkpoint/families.rs with the public files they come from), and
  NAME.pth              the checkpoint in the family's layout (torch.save)
  NAME_ref.safetensors  timm's state dict of the encoder that should be taken (after timm's own conversion, e.g.
                        `checkpoint_filter_fn` for DINOv2, which also resamples pos_embed to the model's grid)
  NAME_io.safetensors   `images`, timm's `tokens` (forward_features) and `feature` (the family's evaluation
                        feature: CLS after norm, or timm's average pool for a model without CLS token)
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
GEN = torch.Generator().manual_seed(1)


def randomize(m):
    """Trained-looking weights: every parameter (norms, layer scale, tokens, pos_embed) matters."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=GEN) * 0.05)
        if getattr(m, "pos_embed", None) is not None:
            m.pos_embed.normal_(0, 0.02, generator=GEN)
    return m


def sd_of(m):
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


def noisy(sd):
    """Another encoder with the same names (a student / online / momentum encoder)."""
    return {k: v + 0.01 * torch.randn(v.shape, generator=GEN) if v.is_floating_point() else v.clone() for k, v in sd.items()}


def optimizer_state(tensors):
    """An AdamW state dict over these tensors after one step, as training code saves it."""
    params = [torch.nn.Parameter(t.clone()) for t in tensors.values() if t.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def args_ns(**kw):
    return argparse.Namespace(**kw)


def mlp_head(prefix, dim, hidden, out_dim, bn=False, weight_norm_last=False):
    """Projection / DINO-style heads: Linear (+BN) layers and optionally a weight-normed last layer."""
    h = {}
    h[f"{prefix}mlp.0.weight" if not bn else f"{prefix}0.weight"] = torch.randn(hidden, dim, generator=GEN)
    if bn:
        h[f"{prefix}1.weight"] = torch.ones(hidden)
        h[f"{prefix}1.bias"] = torch.zeros(hidden)
        h[f"{prefix}1.running_mean"] = torch.zeros(hidden)
        h[f"{prefix}1.running_var"] = torch.ones(hidden)
        h[f"{prefix}1.num_batches_tracked"] = torch.tensor(3)
        h[f"{prefix}3.weight"] = torch.randn(out_dim, hidden, generator=GEN)
    else:
        h[f"{prefix}mlp.0.bias"] = torch.zeros(hidden)
        h[f"{prefix}mlp.2.weight"] = torch.randn(out_dim, hidden, generator=GEN)
        h[f"{prefix}mlp.2.bias"] = torch.zeros(out_dim)
    if weight_norm_last:
        h[f"{prefix}last_layer.weight_g"] = torch.ones(64, 1)
        h[f"{prefix}last_layer.weight_v"] = torch.randn(64, out_dim, generator=GEN)
    return h


def prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


def write(name, obj, ref_model, size, feature="cls", ref_sd=None):
    torch.save(obj, os.path.join(out, name + ".pth"))
    ref_model.eval()
    save_file(ref_sd if ref_sd is not None else sd_of(ref_model), os.path.join(out, name + "_ref.safetensors"))
    x = torch.randn(2, 3, size, size, generator=GEN)
    with torch.no_grad():
        tokens = ref_model.forward_features(x)
        feat = ref_model.forward_head(tokens, pre_logits=True)
    assert feature in ("cls", "avg")
    save_file({"images": x, "tokens": tokens.contiguous(), "feature": feat.contiguous()}, os.path.join(out, name + "_io.safetensors"))


def small_vit(**kw):
    base = dict(img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=3, num_classes=0)
    base.update(kw)
    return randomize(VisionTransformer(**base))


# ---- timm: a bare state dict.
m = small_vit()
write("timm", sd_of(m), m, 32)

# ---- MAE (facebookresearch/mae, main_pretrain.py + util/misc.py:save_model): {'model', 'optimizer', 'epoch',
# 'scaler', 'args'}; the pretraining model has mask_token and the decoder_* decoder.
m = small_vit()
enc = sd_of(m)
d = 64
mae = dict(enc)
mae["mask_token"] = torch.randn(1, 1, d, generator=GEN)
mae["decoder_embed.weight"] = torch.randn(d, 96, generator=GEN)
mae["decoder_embed.bias"] = torch.zeros(d)
mae["decoder_pos_embed"] = torch.randn(1, 65, d, generator=GEN)
dec_block = VisionTransformer(img_size=32, patch_size=4, embed_dim=d, depth=1, num_heads=2, num_classes=0).blocks[0]
mae.update(prefixed("decoder_blocks.0.", sd_of(dec_block)))
mae["decoder_norm.weight"] = torch.ones(d)
mae["decoder_norm.bias"] = torch.zeros(d)
mae["decoder_pred.weight"] = torch.randn(48, d, generator=GEN)
mae["decoder_pred.bias"] = torch.zeros(48)
write("mae", {"model": mae, "optimizer": optimizer_state(mae), "epoch": 400, "scaler": {"scale": 65536.0, "_growth_tracker": 10},
              "args": args_ns(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True, input_size=224)}, m, 32)

# ---- DINO (facebookresearch/dino, main_dino.py): {'student', 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss'
# [, 'fp16_scaler']}; the student is DDP-wrapped, the teacher is not; MultiCropWrapper(backbone, DINOHead).
m = small_vit()
teacher = {**prefixed("backbone.", sd_of(m)), **mlp_head("head.", 96, 128, 32, weight_norm_last=True)}
student = prefixed("module.", {**prefixed("backbone.", noisy(sd_of(m))), **mlp_head("head.", 96, 128, 32, weight_norm_last=True)})
dino = {"student": student, "teacher": teacher, "optimizer": optimizer_state(student), "epoch": 100,
        "args": args_ns(arch="vit_small", patch_size=16, out_dim=65536, teacher_temp=0.04), "dino_loss": {"center": torch.randn(1, 64, generator=GEN)},
        "fp16_scaler": {"scale": 1024.0, "growth_factor": 2.0}}
write("dino", dino, m, 32)
# The same without the loss state: DINO's and iBOT's layouts then cannot be told apart.
write("dino_or_ibot", {k: v for k, v in dino.items() if k not in ("dino_loss", "fp16_scaler")}, m, 32)

# ---- iBOT (bytedance/ibot, main_ibot.py): like DINO with 'ibot_loss' (center, center2), an iBOTHead with a patch
# head (last_layer2), and the backbone's `masked_embed` (models/vision_transformer.py).
m = small_vit()
bb = {**sd_of(m), "masked_embed": torch.randn(1, 96, generator=GEN)}
ihead = {**mlp_head("head.", 96, 128, 32, weight_norm_last=True), "head.last_layer2.weight_g": torch.ones(64, 1), "head.last_layer2.weight_v": torch.randn(64, 32, generator=GEN)}
teacher = {**prefixed("backbone.", bb), **ihead}
student = prefixed("module.", {**prefixed("backbone.", noisy(bb)), **ihead})
write("ibot", {"student": student, "teacher": teacher, "optimizer": optimizer_state(student), "epoch": 800,
               "args": args_ns(arch="vit_small", pred_ratio=0.3), "ibot_loss": {"center": torch.zeros(1, 64), "center2": torch.zeros(1, 1, 64)}}, m, 32)

# ---- MoCo v3 (facebookresearch/moco-v3, main_moco.py + moco/builder.py): {'epoch', 'arch', 'state_dict',
# 'optimizer', 'scaler'}; DDP(MoCo_ViT) with base_encoder (head = projector MLP with BN), momentum_encoder and
# predictor. vits.py's vit_small is 384 wide with 12 heads (timm's has 6), which the shapes cannot tell.
m = randomize(VisionTransformer(img_size=64, patch_size=16, embed_dim=384, depth=1, num_heads=12, num_classes=0))
base = {**sd_of(m), **mlp_head("head.", 384, 256, 128, bn=True)}
predictor = mlp_head("module.predictor.", 128, 256, 128, bn=True)
moco = {**prefixed("module.base_encoder.", base), **prefixed("module.momentum_encoder.", noisy(base)), **predictor}
# (The optimiser state covers the predictor only, to keep the test file small.)
write("mocov3", {"epoch": 300, "arch": "vit_small", "state_dict": moco, "optimizer": optimizer_state(predictor), "scaler": {"scale": 65536.0}}, m, 64)

# ---- I-JEPA (facebookresearch/ijepa, src/train.py): {'encoder', 'predictor', 'target_encoder', 'opt', 'scaler',
# 'epoch', 'loss', 'batch_size', 'world_size', 'lr'}, all DDP-wrapped (`module.`); the ViT has timm's names, no
# CLS token and a patch-only pos_embed; as timm's vit_huge_patch14_gap_224 (class_token=False, global_pool='avg',
# fc_norm=False) it is evaluated by the average of the normed tokens.
m = small_vit(img_size=56, patch_size=14, class_token=False, global_pool="avg", fc_norm=False)
pred = {"module.predictor_embed.weight": torch.randn(48, 96, generator=GEN), "module.mask_token": torch.zeros(1, 1, 48),
        "module.predictor_pos_embed": torch.randn(1, 16, 48, generator=GEN), "module.predictor_norm.weight": torch.ones(48),
        "module.predictor_proj.weight": torch.randn(96, 48, generator=GEN)}
ijepa = {"encoder": prefixed("module.", noisy(sd_of(m))), "predictor": pred, "target_encoder": prefixed("module.", sd_of(m)),
         "opt": optimizer_state(pred), "scaler": None, "epoch": 300, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3}
write("ijepa", ijepa, m, 56, feature="avg")


# ---- DINOv2 (facebookresearch/dinov2, dinov2/models/vision_transformer.py): released backbones are bare state
# dicts with cls_token, a 518-pixel pos_embed including the CLS row, mask_token [1, D], optional register_tokens,
# layer scale ls1/ls2.gamma; timm's checkpoint_filter_fn (_convert_dinov2) maps them and resamples pos_embed.
def dinov2_layout(dim, depth, heads, regs):
    src = randomize(VisionTransformer(img_size=518, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads, init_values=1e-5, num_classes=0))
    sd = sd_of(src)  # timm's names are DINOv2's own for these keys; the pos_embed holds the CLS row
    sd["mask_token"] = torch.zeros(1, dim)
    if regs:
        sd["register_tokens"] = torch.randn(1, regs, dim, generator=GEN)
    return sd


def timm_dinov2(sd, dim, depth, heads, regs, img):
    m = VisionTransformer(img_size=img, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads, init_values=1e-5, num_classes=0,
                          reg_tokens=regs, no_embed_class=bool(regs))
    m.load_state_dict(checkpoint_filter_fn({k: v.clone() for k, v in sd.items()}, m), strict=True)
    return m


sd = dinov2_layout(96, 2, 3, 4)
write("dinov2_reg", sd, timm_dinov2(sd, 96, 2, 3, 4, 224), 224)

# The teacher checkpoint DINOv2's training writes for evaluation (dinov2/train/train.py:do_test,
# {'teacher': model.teacher.state_dict()}): backbone., dino_head., ibot_head., and with block chunking
# (BlockChunk, padded with Identity) `blocks.<chunk>.<global index>.`. No registers here, so pos_embed keeps its CLS
# row and is resampled with it as a prefix token.
sd = dinov2_layout(96, 4, 3, 0)
chunked = {}
for k, v in sd.items():
    if k.startswith("blocks."):
        i = int(k.split(".")[1])
        k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]
    chunked["backbone." + k] = v
chunked.update({"dino_head.mlp.0.weight": torch.randn(128, 96, generator=GEN), "dino_head.last_layer.weight_g": torch.ones(64, 1),
                "ibot_head.mlp.0.weight": torch.randn(128, 96, generator=GEN)})
write("dinov2_teacher", {"teacher": chunked}, timm_dinov2(sd, 96, 4, 3, 0, 224), 224)

# ---- Latent MIM (yibingwei-1/LatentMIM, main_lmim.py + util/misc.py:CheckpointManager): {'state_dict',
# 'optimizer', 'loss_scaler', 'epoch'}; the model (DDP: `module.`) is models_lmim.LMIM: encoder / target_encoder
# are vits.VIT (Linear `embed.proj` over patchify's (row, col, channel) pixels, `pos_embed.pos_embeds` [N+1, D],
# cls_token, timm-named blocks, norm, and a projection `head` of linear<i>/norm<i>), decoder a CrossDecoder.
P, G, D = 4, 8, 96
enc = {"cls_token": torch.randn(1, 1, D, generator=GEN) * 0.02,
       "pos_embed.pos_embeds": torch.randn(G * G + 1, D, generator=GEN) * 0.02,
       "embed.proj.weight": torch.randn(D, P * P * 3, generator=GEN) * 0.1, "embed.proj.bias": torch.randn(D, generator=GEN) * 0.02}
blocks = VisionTransformer(img_size=32, patch_size=P, embed_dim=D, depth=2, num_heads=3, num_classes=0)
randomize(blocks)
for k, v in sd_of(blocks).items():
    if k.startswith("blocks.") or k.startswith("norm."):
        enc[k] = v
head = {"head.linear0.weight": torch.randn(256, D, generator=GEN), "head.norm0.weight": torch.ones(256), "head.norm0.bias": torch.zeros(256),
        "head.linear1.weight": torch.randn(D, 256, generator=GEN), "head.norm1.weight": torch.ones(D), "head.norm1.bias": torch.zeros(D)}
target = {k: v for k, v in enc.items() if not k.startswith("blocks.")}  # target_depth = 0
decoder = {"decoder.embed.weight": torch.randn(64, D, generator=GEN), "decoder.embed.bias": torch.zeros(64), "decoder.mask_token": torch.zeros(1, 1, 64),
           "decoder.head.weight": torch.randn(D, 64, generator=GEN), "decoder.head.bias": torch.zeros(D)}
lmim = {**prefixed("module.encoder.", {**enc, **head}), **prefixed("module.target_encoder.", {**target, **head}), **prefixed("module.", decoder)}

# The timm encoder the online encoder is: conv weight from the Linear, pos_embed from the table.
m = VisionTransformer(img_size=32, patch_size=P, embed_dim=D, depth=2, num_heads=3, num_classes=0)
ref = {k: v for k, v in enc.items() if k.startswith("blocks.") or k.startswith("norm.")}
ref["cls_token"] = enc["cls_token"]
ref["pos_embed"] = enc["pos_embed.pos_embeds"][None]
ref["patch_embed.proj.weight"] = enc["embed.proj.weight"].reshape(D, P, P, 3).permute(0, 3, 1, 2).contiguous()
ref["patch_embed.proj.bias"] = enc["embed.proj.bias"]
m.load_state_dict(ref, strict=True)
m.eval()
# Check against the original model's computation (vits.VIT.forward without its head): patchify, Linear, CLS, table.
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
with torch.no_grad():
    pix = torch.einsum("nchpwq->nhwpqc", x.reshape(2, 3, G, P, G, P)).reshape(2, G * G, P * P * 3)
    h = F.linear(pix, enc["embed.proj.weight"], enc["embed.proj.bias"])
    h = torch.cat([enc["cls_token"].repeat(2, 1, 1), h], 1) + enc["pos_embed.pos_embeds"][None]
    for blk in m.blocks:
        h = blk(h)
    h = m.norm(h)
    assert (h - m.forward_features(x)).abs().max() < 1e-5, "timm view of the Latent MIM encoder differs"
write("lmim", {"state_dict": lmim, "optimizer": optimizer_state(lmim), "loss_scaler": {"scale": 65536.0}, "epoch": 800}, m, 32)
print("ok")
