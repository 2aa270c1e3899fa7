"""Weighted k-NN (DINO) and leave-one-out 1-NN written from their formulas, for the Rust exactness tests and the
k-NN benchmark.

Usage:
  ref_knn.py knn IN OUT    IN: safetensors with `train` [N, D], `train_labels` [N], `val` [M, D], `val_labels` [M]
                           and metadata `config` = {"ks": [...], "temperatures": [...], "num_classes": C}.
                           OUT: `top1` and `top5` [len(T), len(ks)] correct counts, `loo` [1] (LOO 1-NN on val).
  ref_knn.py bench Q N D K REPEAT
                           times the same k-NN search in NumPy (normalise, matmul, top-k, votes) on random
                           features and prints JSON.

Rules (the protocol's definition, which lmim-bench implements):
  - features are L2-normalised (x / max(||x||, 1e-12)); similarity is the dot product;
  - the k neighbours are the bank rows ordered by (similarity desc, index asc); k is capped at the bank size;
  - each neighbour votes exp(sim / T) for its label, accumulated in neighbour order in float64;
  - classes are ranked by (votes desc, class index asc) among the classes present in the k neighbours;
    top-1 is the first, top-5 the first five (so with k < 5 only classes that got a vote count);
  - LOO: for every val row, the most similar other val row (lowest index among ties) gives the prediction.
"""
import json
import math
import sys
import time

import numpy as np


def normalize(x):
    n = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / np.maximum(n, 1e-12)


def knn_counts(train, tl, val, vl, ks, T):
    tr, va = normalize(train), normalize(val)
    sims = va @ tr.T
    # Stable sort of the negated similarities: descending, lower index first among equals.
    order = np.argsort(-sims, axis=1, kind="stable")
    c1 = [0] * len(ks)
    c5 = [0] * len(ks)
    for i in range(va.shape[0]):
        for j, k in enumerate(ks):
            votes = {}
            for n in order[i, : min(k, tr.shape[0])]:
                c = int(tl[n])
                votes[c] = votes.get(c, 0.0) + math.exp(float(sims[i, n]) / T)
            # facebookresearch/dino eval_knn.py: the votes of all classes (0 for the classes without a neighbour)
            # sorted descending, top-5 over the first min(5, k); equal votes go to the lower class index.
            num_classes = int(max(tl.max(), vl.max())) + 1
            ranked = sorted(range(num_classes), key=lambda c: (-votes.get(c, 0.0), c))
            truth = int(vl[i])
            c1[j] += ranked[0] == truth
            c5[j] += truth in ranked[: min(5, k)]
    return c1, c5


def loo_correct(val, vl):
    va = normalize(val)
    sims = va @ va.T
    np.fill_diagonal(sims, -np.inf)
    pred = vl[np.argmax(sims, axis=1)]  # argmax returns the first (lowest) index among ties
    return int((pred == vl).sum())


def cmd_knn(inp, out):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    t = load_file(inp)
    with safe_open(inp, "np") as f:
        cfg = json.loads(f.metadata()["config"])
    train, val = t["train"], t["val"]
    tl, vl = t["train_labels"].astype(np.int64), t["val_labels"].astype(np.int64)
    ks, temps = cfg["ks"], cfg["temperatures"]
    top1 = np.zeros((len(temps), len(ks)), np.int64)
    top5 = np.zeros((len(temps), len(ks)), np.int64)
    for a, T in enumerate(temps):
        c1, c5 = knn_counts(train, tl, val, vl, ks, T)
        top1[a], top5[a] = c1, c5
    save_file({"top1": top1, "top5": top5, "loo": np.array([loo_correct(val, vl)], np.int64)}, out)
    print("ok")


def main():
    if sys.argv[1] == "knn":
        cmd_knn(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "bench":
        q, n, d, k, repeat = map(int, sys.argv[2:7])
        bench(q, n, d, k, repeat)
    else:
        sys.exit(f"unknown command {sys.argv[1]}")


def bench(q, n, d, k, repeat):
    """Vectorised NumPy k-NN over the workload of benches/knn.rs: argpartition top-k, then the same votes."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((q, d), dtype=np.float32)
    labels = rng.integers(0, 1000, n)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        b = normalize(bank)
        qq = normalize(queries)
        for s in range(0, q, 1024):
            sims = qq[s : s + 1024] @ b.T
            part = np.argpartition(-sims, k, axis=1)[:, :k]
            vals = np.take_along_axis(sims, part, axis=1)
            o = np.argsort(-vals, axis=1, kind="stable")
            idx = np.take_along_axis(part, o, axis=1)
            w = np.exp(np.take_along_axis(vals, o, axis=1).astype(np.float64) / 0.07)
            votes = np.zeros((idx.shape[0], 1000))
            np.add.at(votes, (np.arange(idx.shape[0])[:, None], labels[idx]), w)
            np.argsort(-votes, axis=1)[:, :5]
        times.append(time.perf_counter() - t0)
    print(json.dumps({"numpy": np.__version__, "queries": q, "bank": n, "dim": d, "k": k, "seconds": times}))


if __name__ == "__main__":
    main()
