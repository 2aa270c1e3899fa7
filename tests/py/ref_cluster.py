"""Reference clustering for tests/viz_cluster.rs: SciPy's linkage + fcluster(maxclust) on the same features.

Usage: ref_cluster.py FEATURES.f32 N DIM METHOD LEVELS OUT.json
FEATURES.f32 holds N x DIM little-endian float32 values, row-major; LEVELS is comma-separated (e.g. 3,4,5).
Writes {"k": [labels...], ...} with SciPy's 1-based labels.
"""
import json
import sys

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage


def main():
    path, n, dim, method, levels, out = sys.argv[1:7]
    x = np.fromfile(path, dtype="<f4").astype(np.float64).reshape(int(n), int(dim))
    z = linkage(x, method=method, metric="euclidean")
    res = {}
    for k in (int(v) for v in levels.split(",")):
        labels = fcluster(z, t=k, criterion="maxclust")
        if len(set(labels.tolist())) != k:
            sys.exit(f"fcluster gave {len(set(labels.tolist()))} clusters for k={k} (tied merge heights)")
        res[str(k)] = labels.tolist()
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
