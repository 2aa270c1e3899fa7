"""Reference outputs of Pillow's Image.resize for tests/data_pil_resize.rs (src/data/pil_resample.rs).

usage: ref_pil_resize.py OUT_DIR

Writes into OUT_DIR:
  - src_{W}x{H}.rgb: one seeded generated RGB image per source size (numpy: gradients, sinusoidal texture, noise,
    hard-edged shapes, one-pixel lines, a checkerboard and saturated 0/255 areas, so bicubic overshoot is clipped),
    as raw interleaved RGB bytes, row-major, no header;
  - out_{i:03}.rgb: Image.resize((out_w, out_h), resample, box) of that source as raw RGB bytes, for every case:
    upscaling, downscaling (up to 6x, odd sizes such as 333x251 -> 224x224 and 17x9 -> 64x40), mixed (up in x,
    down in y and the reverse), unchanged sizes, and integer and fractional float boxes; each with BILINEAR and
    BICUBIC (reducing_gap=None, Pillow's default, so only libImaging/Resample.c's convolution is involved);
  - manifest.json: {"pillow": version, "cases": [{"src": file, "src_w", "src_h", "channels": 3, "out_w", "out_h",
    "filter": "BILINEAR" | "BICUBIC", "box": [x0, y0, x1, y1], "out": file}, ...]}. The box is always given (the
    whole image when the case has none); its floats are what was passed to Pillow.
"""
import json
import os
import sys

import numpy as np
import PIL
from PIL import Image

# (in_w, in_h, out_w, out_h), each run with both filters and box = the whole image.
SIZES = [
    # upscaling
    (17, 9, 64, 40),
    (8, 8, 32, 32),
    (5, 7, 23, 31),
    (31, 29, 62, 58),
    (40, 30, 41, 31),
    (64, 48, 224, 224),
    (100, 75, 256, 192),
    (3, 2, 11, 5),
    (1, 1, 4, 3),
    (2, 1, 7, 2),
    # downscaling
    (333, 251, 224, 224),
    (500, 375, 341, 256),
    (375, 500, 256, 341),
    (320, 240, 64, 48),
    (320, 240, 160, 120),
    (250, 250, 50, 50),
    (300, 200, 60, 40),
    (301, 199, 60, 39),
    (257, 129, 43, 17),
    (240, 240, 40, 40),
    (97, 83, 13, 11),
    (64, 64, 63, 63),
    (200, 150, 199, 149),
    (123, 77, 1, 1),
    (50, 40, 7, 3),
    (99, 1, 10, 1),
    (1, 99, 1, 10),
    # mixed
    (40, 300, 160, 60),
    (300, 40, 60, 160),
    (33, 201, 96, 17),
    (128, 64, 200, 20),
    (64, 128, 20, 200),
    (7, 250, 50, 50),
    # one axis unchanged (that pass is skipped)
    (120, 80, 120, 33),
    (120, 80, 45, 80),
    (120, 80, 301, 80),
    (120, 80, 120, 211),
    (45, 45, 45, 45),
    # near-identity and odd ratios
    (224, 224, 225, 223),
    (161, 97, 160, 96),
    (81, 121, 243, 40),
    (500, 333, 224, 149),
]

# (in_w, in_h, out_w, out_h, box), each run with both filters.
BOXES = [
    (120, 80, 64, 64, (10.25, 3.5, 100.75, 77.0)),
    (120, 80, 200, 150, (0.5, 0.5, 119.5, 79.5)),
    (120, 80, 33, 47, (7.3, 11.9, 60.1, 79.99)),
    (333, 251, 224, 224, (21.7, 3.2, 310.4, 249.8)),
    (333, 251, 96, 96, (100.0, 50.0, 196.0, 146.0)),  # integer box of the output size: Pillow crops
    (333, 251, 96, 96, (100.0, 50.0, 197.0, 146.0)),
    (64, 48, 224, 224, (12.125, 9.875, 40.0, 33.333333)),
    (17, 9, 64, 40, (0.0, 0.0, 16.9, 8.1)),
    (40, 30, 40, 30, (0.1, 0.0, 40.0, 30.0)),
    (40, 30, 12, 9, (3.0, 3.0, 3.0, 27.5)),  # zero-width box: Pillow allows it
]


def generated(w, h, seed):
    """Seeded RGB image with smooth gradients, texture, noise and sharp edges."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([
        128 + 100 * np.sin(x / max(w, 1) * 7.1 + seed) * np.cos(y / max(h, 1) * 3.3),
        x / max(w - 1, 1) * 255,
        128 + 120 * np.sin((x + 2 * y) / 3.7),
    ], axis=-1)
    img += rng.normal(0, 25, size=(h, w, 3))
    # hard-edged rectangles, some pure black or white
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, w + 1, size=2))
        y0, y1 = sorted(rng.integers(0, h + 1, size=2))
        img[y0:y1, x0:x1] = rng.choice([0, 255, rng.integers(0, 256)], size=3)
    # a disc
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, max(w, h) / 3 + 1)
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = (255, 32, 0)
    # a checkerboard corner and one-pixel lines
    cb = ((x // 2 + y // 2) % 2 == 0) & (x < w / 4) & (y < h / 4)
    img[cb] = 255
    img[:, (np.arange(w) % 11) == 5] = (0, 0, 0)
    img[(np.arange(h) % 13) == 7, :] = (255, 255, 255)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    sources = {}

    def source(w, h):
        if (w, h) not in sources:
            arr = generated(w, h, seed=w * 1000 + h)
            name = f"src_{w}x{h}.rgb"
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(arr.tobytes())
            sources[(w, h)] = (name, Image.fromarray(arr))
        return sources[(w, h)]

    runs = [(iw, ih, ow, oh, (0.0, 0.0, float(iw), float(ih))) for iw, ih, ow, oh in SIZES]
    runs += BOXES
    cases = []
    for iw, ih, ow, oh, box in runs:
        name, im = source(iw, ih)
        for fname in ("BILINEAR", "BICUBIC"):
            res = im.resize((ow, oh), getattr(Image.Resampling, fname), box)
            assert res.mode == "RGB" and res.size == (ow, oh)
            out = f"out_{len(cases):03}.rgb"
            with open(os.path.join(out_dir, out), "wb") as f:
                f.write(res.tobytes())
            cases.append({
                "src": name, "src_w": iw, "src_h": ih, "channels": 3,
                "out_w": ow, "out_h": oh, "filter": fname, "box": list(box), "out": out,
            })
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"pillow": PIL.__version__, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
