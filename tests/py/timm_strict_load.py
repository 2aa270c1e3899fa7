"""Loads a classifier exported by lmim-bench into timm with strict=True and checks its logits.

Usage: timm_strict_load.py CHECKPOINT IO_FILE GLOBAL_POOL
CHECKPOINT: safetensors with timm names (a pico ViT, 10 classes); IO_FILE: `images` and the expected `logits`.
Exits non-zero when a key is missing or unexpected, or when the logits differ by more than 1e-4.
"""
import sys
import torch
from timm.models.vision_transformer import VisionTransformer
from safetensors.torch import load_file

ckpt, io_file, pool = sys.argv[1:4]
m = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10, global_pool=pool)
m.load_state_dict(load_file(ckpt), strict=True)
m.eval()
io = load_file(io_file)
with torch.no_grad():
    err = (m(io["images"]) - io["logits"]).abs().max().item()
print(f"max abs diff {err:.3g}")
sys.exit(0 if err < 1e-4 else 1)
