"""torchvision's ImageFolder view of a split, for tests/data_loader.rs.

usage: imagefolder_data.py SPLIT_DIR OUT_JSON
Writes {"classes": [...], "samples": [[relative path, class index], ...]}.
"""
import json
import os
import sys

from torchvision.datasets import ImageFolder

root, out = sys.argv[1], sys.argv[2]
ds = ImageFolder(root, allow_empty=True)
samples = [[os.path.relpath(p, root), int(c)] for p, c in ds.samples]
with open(out, "w") as f:
    json.dump({"classes": ds.classes, "samples": samples}, f)
