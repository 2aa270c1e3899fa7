"""References of the low-shot protocol (facebookresearch/msn logistic_eval.py) for the Rust tests and benchmark.

Usage:
  ref_lowshot.py fit IN OUT     IN: safetensors with `train` [n, D] f64, `train_labels` [n], `val` [m, D] f64 (raw
                                features) and metadata `config` = {"lambd": .., "num_classes": C, "tol": ..}.
                                Preprocesses both with cyanure.preprocess(X, normalize=True, columns=False,
                                centering=True) and fits scikit-learn's multinomial LogisticRegression(C = 1 / lambd,
                                fit_intercept=False, lbfgs). OUT: `train_pre`, `val_pre` (cyanure's preprocessing),
                                `coef` [C, D], `val_pred` [m], `objective` [1] (the protocol's objective at sklearn's
                                coef, computed in f64).
  ref_lowshot.py ddp N WORLD BATCH OUT
                                the rows torch.utils.data.DistributedSampler(shuffle=True, seed=0) + DataLoader
                                (batch_size=BATCH, drop_last=True) hand out over WORLD ranks, rank by rank, as
                                LatentMIM's eval_knn all-gathers them. OUT: `rows` [k] i64.
  ref_lowshot.py make N D C SEED OUT
                                ImageNet-shaped features for the benchmark: C class means on a rank-64 subspace plus
                                isotropic noise, a per-row offset (what the row centring removes), N rows with classes
                                as even as N allows. OUT: safetensors `x` [N, D] f32, `y` [N] i64.
  ref_lowshot.py bench N D C LAMBD OUT_JSON FEATURES
                                times scikit-learn (lbfgs) and cyanure on the features file FEATURES (safetensors
                                `x` [N, D] f32, `y` [N]) and writes the objectives and seconds as JSON.

The objective is (1/n) sum_i CE(x_i W, y_i) + (lambda / 2) ||W||^2 with lambda = lambd / n. scikit-learn minimises
C * sum_i CE_i + 1/2 ||W||^2; dividing by C n gives (1/n) sum CE + 1 / (2 C n) ||W||^2, the same with C = 1 / lambd.
"""
import json, os
import sys
import time

import numpy as np
from safetensors.numpy import load_file, save_file


def cyanure_preprocess(x):
    # cyanure 1.2.2 keeps MSN's `cyan.preprocess` (cyanure 0.x) in cyanure.data_processing; it works in place on X
    # (X.T is Fortran-ordered, so no copy is made) and returns None.
    from cyanure.data_processing import preprocess

    x = np.ascontiguousarray(x.copy())
    preprocess(x, normalize=True, columns=False, centering=True)
    return x


def objective(x, y, w, lambd):
    """w: [D, C]."""
    n = x.shape[0]
    logits = x @ w
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    ce = lse - logits[np.arange(n), y]
    return ce.mean() + 0.5 * (lambd / n) * (w * w).sum()


def fit(inp, out):
    from sklearn.linear_model import LogisticRegression

    f = load_file(inp)
    import safetensors

    with safetensors.safe_open(inp, "np") as h:
        cfg = json.loads(h.metadata()["config"])
    lambd, tol = cfg["lambd"], cfg.get("tol", 1e-10)
    tr = cyanure_preprocess(f["train"].astype(np.float64))
    va = cyanure_preprocess(f["val"].astype(np.float64))
    y = f["train_labels"].astype(np.int64)
    clf = LogisticRegression(C=1.0 / lambd, fit_intercept=False, tol=tol, max_iter=100000, solver="lbfgs")
    clf.fit(tr, y)
    # coef_ rows follow clf.classes_; the test data uses every class, so they are 0..C-1.
    assert list(clf.classes_) == list(range(cfg["num_classes"])), clf.classes_
    w = clf.coef_.T
    pred = clf.classes_[np.argmax(va @ w, axis=1)]
    save_file(
        {
            "train_pre": tr,
            "val_pre": va,
            "coef": np.ascontiguousarray(clf.coef_),
            "val_pred": pred.astype(np.int64),
            "objective": np.array([objective(tr, y, w, lambd)]),
        },
        out,
    )


def ddp(n, world, batch, out):
    import torch

    # LatentMIM main_lmim.py: DistributedSampler(db_eval, num_replicas, rank, shuffle=True) (seed 0, the sampler's
    # drop_last False), DataLoader(..., batch_size, drop_last=True); eval_knn all-gathers rank by rank.
    ds = list(range(n))
    rows = []
    for rank in range(world):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True)
        loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=batch, drop_last=True)
        for b in loader:
            rows.extend(int(i) for i in b)
    save_file({"rows": np.array(rows, dtype=np.int64)}, out)


def bench(n, d, c, lambd, out_json, features):
    from sklearn.linear_model import LogisticRegression
    from cyanure.estimators import Classifier

    f = load_file(features)
    x, y = f["x"].astype(np.float64), f["y"].astype(np.int64)
    x = cyanure_preprocess(x)
    res = {}

    def save():
        # Written after every solver, so a run cut short keeps what it measured.
        with open(out_json, "w") as fh:
            json.dump(res, fh, indent=1)

    def sk(tol):
        t = time.perf_counter()
        clf = LogisticRegression(C=1.0 / lambd, fit_intercept=False, tol=tol, max_iter=100000, solver="lbfgs")
        clf.fit(x, y)
        res[f"sklearn_lbfgs_tol{tol:g}"] = {"seconds": time.perf_counter() - t, "objective": objective(x, y, clf.coef_.T, lambd), "iterations": int(clf.n_iter_[0])}
        save()

    sk(1e-6)
    # scikit-learn to the same optimum.
    sk(1e-10)
    if os.environ.get("LOWSHOT_BENCH_CYANURE", "1") == "0":
        return
    # MSN's call (logistic_eval.py): lambd / n, tol 1e-3, max_epochs 300, solver auto.
    t = time.perf_counter()
    cl = Classifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False, lambda_1=lambd / n, tol=1e-3, max_iter=300, solver="auto", random_state=0, verbose=False)
    cl.fit(x, y)
    w = np.asarray(cl.coef_)
    w = w if w.shape == (d, c) else w.T
    res["cyanure_msn"] = {"seconds": time.perf_counter() - t, "objective": objective(x, y, w, lambd)}
    save()


def make(n, d, c, seed, out):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((64, d)) / np.sqrt(64)
    means = rng.standard_normal((c, 64)) @ basis * 2.0
    y = np.arange(n) % c
    rng.shuffle(y)
    x = means[y] + rng.standard_normal((n, d)) + rng.standard_normal((n, 1)) * 2.0
    save_file({"x": x.astype(np.float32), "y": y.astype(np.int64)}, out)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "fit":
        fit(sys.argv[2], sys.argv[3])
    elif cmd == "ddp":
        ddp(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif cmd == "make":
        make(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif cmd == "bench":
        bench(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6], sys.argv[7])
    else:
        sys.exit(f"unknown command {cmd}")
