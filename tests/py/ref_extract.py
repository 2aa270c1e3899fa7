"""Features of a timm ViT over an ImageFolder with torchvision's eval transform, for the end-to-end k-NN test.

Usage:
  ref_extract.py features CKPT DATA OUT
      CKPT: safetensors state dict of a vit_pico_patch4_32 (timm names); DATA: root with train/ and val/.
      OUT: safetensors with `{split}_cls` (CLS after the final norm), `{split}_avg_prenorm` (mean of the last
      block's patch tokens before the final norm) and `{split}_labels` for train and val, and `knn_top1`,
      `knn_top5` (k=20, T=0.07, cls features) and `loo_top1` (avg-prenorm) from ref_knn.py's formulas, in percent.
"""
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torchvision import datasets, transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_knn  # noqa: E402


def features(ckpt, data, out):
    torch.set_num_threads(2)
    m = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=0)
    missing, unexpected = m.load_state_dict(load_file(ckpt), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    m.eval()
    tf = transforms.Compose([
        transforms.Resize(36, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    res = {}
    for split in ("train", "val"):
        ds = datasets.ImageFolder(os.path.join(data, split), transform=tf)
        loader = torch.utils.data.DataLoader(ds, batch_size=100, shuffle=False, num_workers=0)
        cls, pre, labels = [], [], []
        with torch.no_grad():
            for x, y in loader:
                h = m._pos_embed(m.patch_embed(x))
                h = m.blocks(h)
                pre.append(h[:, 1:].mean(1))
                cls.append(m.norm(h)[:, 0])
                labels.append(y)
        res[f"{split}_cls"] = torch.cat(cls).contiguous()
        res[f"{split}_avg_prenorm"] = torch.cat(pre).contiguous()
        res[f"{split}_labels"] = torch.cat(labels).long().contiguous()
    tr, va = res["train_cls"].numpy(), res["val_cls"].numpy()
    tl, vl = res["train_labels"].numpy(), res["val_labels"].numpy()
    c1, c5 = ref_knn.knn_counts(tr, tl, va, vl, [20], 0.07)
    n = len(vl)
    res["knn_top1"] = torch.tensor([100.0 * c1[0] / n], dtype=torch.float64)
    res["knn_top5"] = torch.tensor([100.0 * c5[0] / n], dtype=torch.float64)
    loo = ref_knn.loo_correct(res["val_avg_prenorm"].numpy(), vl)
    res["loo_top1"] = torch.tensor([100.0 * loo / n], dtype=torch.float64)
    save_file(res, out)
    print("ok")


if __name__ == "__main__":
    if sys.argv[1] == "features":
        features(*sys.argv[2:5])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
