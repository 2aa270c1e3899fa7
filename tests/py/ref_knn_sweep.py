"""Brute-force reference for the probing benchmark's k-NN sweep (billpsomas/efficient-probing at
b8f4fb84e8127d41aaad997d35b98c2f43f33125: engine_finetune.py knn_classifier, one call per (k, T) as
main_linprobe.py run_knn_eval makes them; the best pair as tools/parse_knn.py picks it, Python's max over the grid
in (T, k) order), written here from the formula: L2-normalised features, the k most similar train rows, each votes
exp(sim / T) for its label, the class with most votes is the prediction.

Usage: ref_knn_sweep.py TRAIN.safetensors VAL.safetensors OUT.safetensors KS TS
TRAIN/VAL: `features` [N, D], `labels` [N]. KS, TS: comma-separated k and T.
OUT: `top1` [len(TS), len(KS)] (percent), `best` [k, T, top1].
"""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

train, val = load_file(sys.argv[1]), load_file(sys.argv[2])
ks = [int(k) for k in sys.argv[4].split(",")]
ts = [float(t) for t in sys.argv[5].split(",")]
bank = F.normalize(train["features"].double(), dim=1)
queries = F.normalize(val["features"].double(), dim=1)
classes = int(max(train["labels"].max(), val["labels"].max())) + 1
sims = queries @ bank.T
grid, best = torch.zeros(len(ts), len(ks), dtype=torch.float64), None
for i, t in enumerate(ts):
    for j, k in enumerate(ks):
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(queries), classes, dtype=torch.float64)
        votes.scatter_add_(1, train["labels"][idx], (top / t).exp())
        top1 = 100.0 * (votes.argmax(dim=1) == val["labels"]).double().mean().item()
        grid[i, j] = top1
        if best is None or top1 > best[2]:
            best = (k, t, top1)
save_file({"top1": grid, "best": torch.tensor(best, dtype=torch.float64)}, sys.argv[3])
print("ok")
