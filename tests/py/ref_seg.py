"""Reference for `eval --protocol seg` (tests/seg.rs), written from facebookresearch/capi's eval_segmentation.py
(KNNClassifier, LogregClassifier, Classifier.fit / select_hparams, mIoU, accuracy, eval_model's transforms),
utils.py (extract_features' rearrangement, the StandardScaler standardisation) and data.py (ADE20K's layout).
Differences from running that script, all outside what is compared:
- scikit-learn's LogisticRegression (lbfgs, the docstring's CPU equivalent) in cuML's place;
- `_find_closest_chunk` runs eagerly (CAPI wraps it in torch.compile, which changes nothing but speed);
- no torch.distributed: one rank, so `select_hparams` scores every grid point itself;
- the held-out split is given (the Rust side's seeded permutation) instead of `np.random.permutation`.

Commands:
  vit OUT                         a seeded timm ViT (224 px, patch 16, width 96, depth 2) as safetensors
  read DATA RES OUT               images and labels of both splits through CAPI's transforms
  features DATA CKPT N OUT        timm forward_features patch tokens (after the final norm) of the first N
                                  training images
  bench-data N_TRAIN N_VAL DIM CLASSES OUT
                                  clustered patch features and labels for timing
  bench IN.safetensors OUT.json   time of the k-NN (k = 10, cosine) and the logistic regression (C = 1), fit
                                  and predict, on them
  classify IN.safetensors CFG.json OUT.json [CFG.json OUT.json ...]
                                  CAPI's pipeline on given features: scaler, grid selection, refit, scores
"""
import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import sklearn.linear_model
import sklearn.metrics
import torch
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.preprocessing import StandardScaler

IMAGENET_NORM = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ------------------------------------------------------------------ data (data.py:ADE20K, eval_model's transforms)
def pairs(data, split):
    root = Path(data)
    if not (root / "images").is_dir():
        root = root / "ADEChallengeData2016"
    stems = sorted(x.stem for x in (root / "images" / split).glob("*.jpg"))
    return [(root / "images" / split / f"{s}.jpg", root / "annotations" / split / f"{s}.png") for s in stems]


def transforms(res):
    image = T.Compose([T.Resize((res, res), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), IMAGENET_NORM])
    target = T.Compose([
        lambda im: im.convert("P"),
        T.Resize((res, res), interpolation=T.InterpolationMode.NEAREST),
        np.asarray,
        torch.tensor,
    ])
    return image, target


def read(img_path, ann_path, res):
    image, target = transforms(res)
    return image(Image.open(img_path).convert("RGB")), target(Image.open(ann_path))


def patchify(labels, ps):
    # extract_features: "bs (ih ph) (iw pw) -> (bs ih iw) (ph pw)"
    h, w = labels.shape[-2:]
    ih, iw = h // ps, w // ps
    return labels.reshape(-1, ih, ps, iw, ps).permute(0, 1, 3, 2, 4).reshape(-1, ps * ps)


# ------------------------------------------------------------------ model (baselines/timm_loader.py's TimmAdapter)
def vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=2, num_heads=3, num_classes=0)
    with torch.no_grad():
        m.pos_embed.normal_(0, 0.02)
    return m.eval()


def load_vit(path):
    m = vit()
    m.load_state_dict(load_file(path))
    return m.eval()


# ------------------------------------------------------------------ eval_segmentation.py
def accuracy(y_true, y_pred, ignore_labels):
    gt = y_true.flatten().cpu().numpy()
    pred = y_pred.flatten().cpu().numpy()
    mask = ~np.isin(gt, ignore_labels)
    return float(np.mean((gt[mask] == pred[mask]).astype(float)))


def miou(y_true, y_pred, ignore_labels):
    gt = y_true.flatten().cpu().numpy()
    pred = y_pred.flatten().cpu().numpy()
    mask = ~np.isin(gt, ignore_labels)
    return float(sklearn.metrics.jaccard_score(gt[mask], pred[mask], average="macro"))


def per_class_iou(y_true, y_pred, ignore_labels):
    gt = y_true.flatten().cpu().numpy()
    pred = y_pred.flatten().cpu().numpy()
    mask = ~np.isin(gt, ignore_labels)
    labels = np.unique(np.concatenate([gt[mask], pred[mask]]))
    ious = sklearn.metrics.jaccard_score(gt[mask], pred[mask], average=None, labels=labels)
    return {str(int(l)): float(v) for l, v in zip(labels, ious)}


class Classifier:
    def fit(self, features, labels):
        self.unfit()
        if self.train_set_subsampling > 1:
            labels = labels[:: self.train_set_subsampling]
            features = features[:: self.train_set_subsampling]
        mask = torch.isin(labels.mode(dim=-1).values, torch.tensor(self.ignore_labels))
        self._fit(features[~mask], labels[~mask])

    def unfit(self):
        pass

    def upscale(self, labels):
        return labels[:, None].expand(-1, self.n_pixels_per_sample)

    def select_hparams(self, features_train, labels_train, features_val, labels_val):
        names, grids = zip(*self.hparam_grids.items())
        grid = list(itertools.product(*grids))
        metrics = {}
        if len(grid) > 1:
            results = {}
            for idx, point in enumerate(grid):
                for k, v in zip(names, point):
                    setattr(self, k, v)
                self.fit(features_train, labels_train)
                results[idx] = miou(labels_val, self.predict(features_val), self.ignore_labels)
                self.unfit()
            best_idx, _ = max(results.items(), key=lambda x: x[1])
            best = grid[best_idx]
            for idx, score in results.items():
                metrics["_".join(f"{k}={v}" for k, v in zip(names, grid[idx]))] = score
        else:
            best = grid[0]
        for k, v in zip(names, best):
            setattr(self, k, v)
        return metrics, dict(zip(names, best))

    @torch.no_grad()
    def predict(self, features):
        predictions = torch.zeros(features.shape[0], self.n_pixels_per_sample, dtype=self.label_dtype)
        for i in range(0, features.shape[0], self.inference_bs):
            predictions[i: i + self.inference_bs] = self._predict_batch(features[i: i + self.inference_bs])
        return predictions


class KNNClassifier(Classifier):
    def __init__(self, ignore_labels, inference_bs=1024, train_set_chunk_size=262144, train_set_subsampling=1,
                 dtype="float32", num_neighbors=(1, 3, 10, 30), distance=("cosine", "L2")):
        self.dtype = getattr(torch, dtype)
        self.inference_bs = inference_bs
        self.train_set_chunk_size = train_set_chunk_size
        self.train_set_subsampling = train_set_subsampling
        self.ignore_labels = ignore_labels
        self.hparam_grids = {"num_neighbors": num_neighbors, "distance": distance}

    def unfit(self):
        for a in ("train_X", "train_y"):
            if hasattr(self, a):
                delattr(self, a)

    def _fit(self, features, labels):
        self.train_X = features.to(self.dtype)
        self.train_y = labels
        self.n_pixels_per_sample = labels.shape[-1]
        self.label_dtype = labels.dtype

    def _cdist(self, a, b):
        if self.distance == "L2":
            return torch.cdist(a, b, p=2)
        if self.distance == "cosine":
            a = a / torch.norm(a, dim=-1)[:, None]
            b = b / torch.norm(b, dim=-1)[:, None]
            return 1 - a @ b.T
        raise NotImplementedError

    def _find_closest_chunk(self, queries, keys, values):
        dists = self._cdist(queries, keys)
        k = min(self.num_neighbors, dists.shape[-1])
        distances, indices = torch.topk(dists, k, dim=-1, largest=False)
        closest = torch.gather(values, 0, indices.flatten()[..., None].expand(indices.numel(), values.shape[1]))
        return distances, closest.reshape(*indices.shape, *values.shape[1:])

    def _predict_batch(self, features):
        features = features.to(self.dtype)
        chunk = self.train_set_chunk_size or self.train_X.shape[0]
        dists, labels = [], []
        for i in range(0, self.train_X.shape[0], chunk):
            d, v = self._find_closest_chunk(features, self.train_X[i: i + chunk], self.train_y[i: i + chunk])
            dists.append(d)
            labels.append(v)
        _, idx = torch.topk(torch.cat(dists, dim=1), self.num_neighbors, dim=1, largest=False)
        neighbours = torch.gather(torch.cat(labels, dim=1), 1, idx[..., None].expand(*idx.shape, self.train_y.shape[1]))
        if getattr(self, "perturb", False):
            # The perturbation the test must catch: the largest label wins a tie of the vote.
            return (255 - (255 - neighbours).mode(dim=1).values).to(neighbours.dtype)
        return neighbours.mode(dim=1).values


class LogregClassifier(Classifier):
    def __init__(self, ignore_labels, train_set_subsampling=1, inference_bs=1024,
                 C=tuple(10 ** np.linspace(-6, 5, 8)), max_iter=(1000,), tol=(1e-12,)):
        self.train_set_subsampling = train_set_subsampling
        self.inference_bs = inference_bs
        self.ignore_labels = ignore_labels
        self.hparam_grids = {"C": C, "max_iter": max_iter, "tol": tol}

    def unfit(self):
        if hasattr(self, "estimator"):
            del self.estimator

    def _fit(self, features, labels):
        self.label_dtype = labels.dtype
        # cuML's LogisticRegression(penalty="l2", C, max_iter, tol) with L-BFGS; scikit-learn's on the CPU.
        self.estimator = sklearn.linear_model.LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol)
        self.n_pixels_per_sample = labels.shape[-1]
        self.estimator.fit(features.cpu().numpy(), labels.cpu().mode(dim=-1).values.flatten().numpy())

    def _predict_batch(self, features):
        return self.upscale(torch.from_numpy(self.estimator.predict(features.numpy())))


def classify(inp, cfg_path, out):
    t = load_file(inp)
    cfg = json.load(open(cfg_path))
    per_image = cfg["per_image"]
    ignore = cfg["ignore"]
    held, rest = cfg["held"], cfg["rest"]

    def rows(x, images):
        idx = torch.tensor([i * per_image + p for i in images for p in range(per_image)], dtype=torch.long)
        return x[idx]

    # eval_model: Subset(train, idxs[n // 10:]) is "train", Subset(train, idxs[: n // 10]) is "val".
    feats = {"train": rows(t["train_x"], rest), "test": t["val_x"]}
    labels = {"train": rows(t["train_y"], rest), "test": t["val_y"]}
    if held:
        feats["val"], labels["val"] = rows(t["train_x"], held), rows(t["train_y"], held)
    if cfg["standardize"]:
        scaler = StandardScaler().fit(feats["train"].numpy())
        for k in feats:
            feats[k] = torch.tensor(scaler.transform(feats[k].numpy()))
    result = {}
    for name in cfg["classifiers"]:
        if name == "knn":
            c = KNNClassifier(ignore, train_set_chunk_size=cfg["knn_chunk"], train_set_subsampling=cfg["train_subsample"],
                              dtype=cfg["knn_dtype"], num_neighbors=cfg["knn_k"], distance=cfg["knn_distance"])
            c.perturb = cfg.get("perturb", False)
        else:
            c = LogregClassifier(ignore, train_set_subsampling=cfg["train_subsample"], C=cfg["logreg_c"],
                                 max_iter=(cfg["logreg_max_iter"],), tol=(cfg["logreg_tol"],))
        if held:
            grid, chosen = c.select_hparams(feats["train"], labels["train"], feats["val"], labels["val"])
            all_x, all_y = torch.cat([feats["train"], feats["val"]]), torch.cat([labels["train"], labels["val"]])
        else:
            grid, chosen = c.select_hparams(feats["train"], labels["train"], None, None)
            all_x, all_y = feats["train"], labels["train"]
        c.fit(all_x, all_y)
        preds = c.predict(feats["test"])
        result[name] = {
            "grid": grid, "chosen": {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in chosen.items()},
            "miou": miou(labels["test"], preds, ignore), "acc": accuracy(labels["test"], preds, ignore),
            "per_class": per_class_iou(labels["test"], preds, ignore),
        }
    json.dump(result, open(out, "w"), indent=1)


def main():
    cmd = sys.argv[1]
    if cmd == "vit":
        m = vit()
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[2])
    elif cmd == "read":
        data, res, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        tensors = {}
        for split in ("training", "validation"):
            for i, (img, ann) in enumerate(pairs(data, split)):
                x, y = read(img, ann, res)
                tensors[f"{split}_image_{i}"] = x.contiguous()
                tensors[f"{split}_label_{i}"] = y.contiguous()
        save_file(tensors, out)
    elif cmd == "features":
        data, ckpt, n, out = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        m = load_vit(ckpt)
        xs = torch.stack([read(img, ann, 224)[0] for img, ann in pairs(data, "training")[:n]])
        with torch.no_grad():
            tok = m.forward_features(xs)[:, m.num_prefix_tokens:]
        save_file({"images": xs.contiguous(), "tokens": tok.contiguous()}, out)
    elif cmd == "bench-data":
        # Clustered patch features of `classes` classes and their 256 pixel labels (a patch's own class, a
        # neighbour's on a quarter of its pixels, unlabeled on some), for timing on realistic label structure.
        n_train, n_val, dim, classes = (int(v) for v in sys.argv[2:6])
        out = sys.argv[6]
        g = torch.Generator().manual_seed(0)
        means = torch.randn(classes + 1, dim, generator=g)
        tensors = {}
        for split, n in (("train", n_train), ("val", n_val)):
            y = torch.randint(1, classes + 1, (n,), generator=g)
            x = means[y] + 2.0 * torch.randn(n, dim, generator=g)
            lab = y[:, None].repeat(1, 256)
            other = torch.randint(0, classes + 1, (n,), generator=g)
            lab[:, :64] = torch.where(torch.rand(n, 1, generator=g) < 0.5, other[:, None], lab[:, :64])
            tensors[f"{split}_x"], tensors[f"{split}_y"] = x.float().contiguous(), lab.to(torch.uint8).contiguous()
        save_file(tensors, out)
    elif cmd == "bench":
        import time
        t = load_file(sys.argv[2])
        res = {"threads": torch.get_num_threads()}
        for name, make in (("knn", lambda: KNNClassifier([0, 255], num_neighbors=(10,), distance=("cosine",))),
                           ("logreg", lambda: LogregClassifier([0, 255], C=(1.0,)))):
            c = make()
            t0 = time.perf_counter()
            c.select_hparams(t["train_x"], t["train_y"], None, None)
            c.fit(t["train_x"], t["train_y"])
            preds = c.predict(t["val_x"])
            res[name] = {"seconds": time.perf_counter() - t0, "miou": miou(t["val_y"], preds, [0, 255])}
        json.dump(res, open(sys.argv[3], "w"))
    elif cmd == "classify":
        # One process for several configurations: CFG OUT pairs.
        for cfg, out in zip(sys.argv[3::2], sys.argv[4::2]):
            classify(sys.argv[2], cfg, out)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
