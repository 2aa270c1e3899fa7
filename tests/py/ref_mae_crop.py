"""MAE's single-draw RandomResizedCrop size rule (facebookresearch/mae util/crop.py, get_params), on given draws.

Usage: ref_mae_crop.py  -> prints JSON rows [width, height, u_area, u_ratio, h, w] for a grid of draws.
The uniform draws of `torch.empty(1).uniform_(a, b)` are replaced by a + (b - a) * u with the given u.
"""
import json
import math
import torch

scale, ratio = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)
rows = []
for width, height in [(500, 375), (32, 32), (28, 28), (40, 300)]:
    for u_area in [0.0, 0.13, 0.5, 0.77, 0.999]:
        for u_ratio in [0.0, 0.31, 0.5, 0.92, 0.999]:
            area = height * width
            target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
            log_ratio = torch.log(torch.tensor(ratio))
            aspect_ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            w = min(w, width)
            h = min(h, height)
            rows.append([width, height, u_area, u_ratio, h, w])
print(json.dumps(rows))
