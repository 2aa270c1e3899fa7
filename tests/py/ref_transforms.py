"""Reference outputs of torchvision + PIL transforms for tests/data_transforms.rs.

usage: ref_transforms.py OUT_DIR

Writes a few generated images (JPEGs of several sizes, a greyscale JPEG, a 4:4:4 JPEG, a PNG) and, for each, the
PIL-decoded RGB pixels and torchvision's outputs (CHW float32, little-endian raw) of
  - eval: Resize(256, bicubic) + CenterCrop(224) + ToTensor + Normalize(ImageNet),
  - crops: F.resized_crop(img, top, left, h, w, [224, 224], BICUBIC) + ToTensor + Normalize, for given boxes.
manifest.json lists everything.
"""
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
import torchvision.transforms as T
import torchvision.transforms.functional as F

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def natural(w, h, seed):
    """Gradients, shapes and smoothed noise: content with edges and texture, like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([
        120 + 100 * np.sin(x / w * 3.1 + seed),
        110 + 90 * np.cos(y / h * 2.3 + x / w),
        100 + 80 * np.sin((x + y) / (w + h) * 5.0),
    ], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.ellipse([x0, y0, x1, y1], fill=col)
        else:
            d.rectangle([x0, y0, x1, y1], fill=col)
    for _ in range(6):
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        d.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 6)))
    arr = np.asarray(img).astype(np.int16) + (rng.normal(0, 10, (h, w, 3))).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    return img


def chw(t):
    return t.numpy().astype("<f4")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    specs = [
        # name, w, h, mode, format, save kwargs
        ("photo_500x375", 500, 375, "RGB", "JPEG", dict(quality=90)),
        ("portrait_333x500", 333, 500, "RGB", "JPEG", dict(quality=85)),
        ("gray_300x260", 300, 260, "L", "JPEG", dict(quality=90)),
        ("q95_444_641x427", 641, 427, "RGB", "JPEG", dict(quality=95, subsampling=0)),
        ("small_180x120", 180, 120, "RGB", "JPEG", dict(quality=90)),
        ("png_400x300", 400, 300, "RGB", "PNG", {}),
    ]
    normalize = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    eval_tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    items = []
    for i, (name, w, h, mode, fmt, kw) in enumerate(specs):
        img = natural(w, h, i)
        if mode == "L":
            img = img.convert("L")
        ext = "jpg" if fmt == "JPEG" else "png"
        path = os.path.join(out, f"{name}.{ext}")
        img.save(path, fmt, **kw)
        # What torchvision's default loader sees.
        with open(path, "rb") as f:
            pil = Image.open(f).convert("RGB")
        np.asarray(pil).astype(np.uint8).tofile(os.path.join(out, f"{name}.rgb"))
        chw(normalize(eval_tf(pil))).tofile(os.path.join(out, f"{name}.eval.f32"))
        boxes = [
            (h // 7, w // 5, int(h * 0.6), int(w * 0.5)),  # downscale
            (3, 7, 61, 47),  # small crop, upscaled
            (0, 0, h, w),  # whole image
        ]
        crops = []
        for j, (top, left, bh, bw) in enumerate(boxes):
            t = F.resized_crop(pil, top, left, bh, bw, [224, 224], T.InterpolationMode.BICUBIC)
            fn = f"{name}.crop{j}.f32"
            chw(normalize(t)).tofile(os.path.join(out, fn))
            crops.append(dict(top=top, left=left, height=bh, width=bw, file=fn))
        items.append(dict(name=name, file=os.path.basename(path), width=w, height=h,
                          rgb=f"{name}.rgb", eval=f"{name}.eval.f32", crops=crops))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(dict(mean=MEAN, std=STD, size=224, images=items), f, indent=1)


if __name__ == "__main__":
    main()
