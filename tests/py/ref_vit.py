"""Reference outputs of timm ViTs for the Rust parity test.

Usage: ref_vit.py OUT_DIR
For each model (a tiny ViT, patch 4 on 32 px, and vit_base_patch16_224), random init with a fixed seed, writes
  <name>.safetensors      the timm state dict (num_classes=0), with a random (not sin-cos) pos_embed
  <name>.pth              the same state dict saved by torch.save, nested under "model" with a "module." prefix
  <name>_io.safetensors   inputs `images` and outputs `tokens` (forward_features: final tokens after norm),
                          `block_1` (output of block 1 before norm), `cls`, `avg`
and two pico classifiers with 10 classes, `pico_cls_avg` (global_pool='avg': fc_norm, no final norm, as MAE's
fine-tuned models) and `pico_cls_token` (global_pool='token'): <name>.safetensors and <name>_io.safetensors with
`images` and `logits`.
"""
import sys, os
import torch
import timm
from timm.models.vision_transformer import VisionTransformer
from safetensors.torch import save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)

models = {
    "vit_pico_patch4_32": (VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=0), 32, 4),
    "vit_base_patch16_224": (timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), 224, 2),
}
for name, (m, size, batch) in models.items():
    m.eval()
    with torch.no_grad():
        m.pos_embed.normal_(0, 0.02)  # a trained-looking pos_embed, so loading it really matters
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, f"{out}/{name}.safetensors")
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 1}, f"{out}/{name}.pth")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    with torch.no_grad():
        feats = m.forward_features(x)
        h = m.patch_embed(x)
        h = m._pos_embed(h)
        h = m.blocks[0](h)
        h = m.blocks[1](h)
    save_file({"images": x, "tokens": feats.contiguous(), "block_1": h.contiguous(),
               "cls": feats[:, 0].contiguous(), "avg": feats[:, 1:].mean(1).contiguous()},
              f"{out}/{name}_io.safetensors")
for name, pool in [("pico_cls_avg", "avg"), ("pico_cls_token", "token")]:
    m = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10, global_pool=pool)
    m.eval()
    with torch.no_grad():
        m.pos_embed.normal_(0, 0.02)
        for p in m.parameters():  # non-trivial norms and head, so that each one matters
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, f"{out}/{name}.safetensors")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = m(x)
    save_file({"images": x, "logits": logits.contiguous()}, f"{out}/{name}_io.safetensors")
print("ok")
