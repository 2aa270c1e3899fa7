"""References for tests/davis.rs: DINO's DAVIS-2017 label propagation (facebookresearch/dino eval_video_segmentation.py,
commit 7c446df) and davis2017-evaluation's J&F (davisvideochallenge/davis2017-evaluation, commit ac7c43f), written
here from their definitions, with the same OpenCV / PIL / scikit-image calls they make.

Usage:
  ref_davis.py resize OUT.safetensors
      seeded random 8-bit RGB images through cv2.resize (INTER_LINEAR) at many sizes: src_<i>, dst_<i>
  ref_davis.py read DATA SHORT PATCH OUT.safetensors
      DINO's read_frame (cv2.imread + cv2.resize + color_normalize) of every frame and read_seg of every first
      annotation of the DAVIS-layout set DATA: frame_<seq>_<t> [3, H, W], seg_<seq> one-hot [1, C, h, w]
  ref_davis.py vit OUT_DIR
      a seeded timm ViT (patch 4, 32 px, random pos_embed) as pico.safetensors; io.safetensors holds a 40x72 input
      and the tokens of DINO's forward (interpolate_pos_encoding) and of the sin-cos table made for the 10x18 grid
  ref_davis.py propagate DATA CKPT SHORT OUT_DIR
      DINO's eval loop with the timm ViT CKPT (pico, patch 4) at short side SHORT, one frame per forward as its
      script does: masks OUT_DIR/<seq>/<frame>.png
  ref_davis.py jf DATA RESULTS OUT.json
      davis2017-evaluation's semi-supervised J and F of every scored frame and object, and its summary
  ref_davis.py timm ARCH OUT.safetensors
      a seeded random timm encoder of that architecture (num_classes=0), for the benchmark
  ref_davis.py bench DATA CKPT ARCH SHORT FRAMES OUT.json
      frames/s of DINO's loop (this reimplementation) on the first FRAMES frames of the first sequence, CPU
"""
import json
import math
import os
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file, load_file

torch.set_grad_enabled(False)


# ---------------------------------------------------------------- DINO's reading (eval_video_segmentation.py)
def color_normalize(x, mean=(0.485, 0.456, 0.406), std=(0.228, 0.224, 0.225)):
    for t, m, s in zip(x, mean, std):
        t.sub_(m)
        t.div_(s)
    return x


def read_frame(path, short):
    img = cv2.imread(path)
    ori_h, ori_w, _ = img.shape
    if ori_h > ori_w:
        tw = short
        th = int(((tw * ori_h) / ori_w // 64) * 64)
    else:
        th = short
        tw = int(((th * ori_w) / ori_h // 64) * 64)
    img = cv2.resize(img, (tw, th)).astype(np.float32) / 255.0
    img = np.transpose(img[:, :, ::-1].copy(), (2, 0, 1))
    return color_normalize(torch.from_numpy(img).float()), ori_h, ori_w


def to_one_hot(y):
    n = int(y.max() + 1)
    _, h, w = y.size()
    y = y.type(torch.LongTensor).view(-1, 1)
    oh = torch.zeros(y.size()[0], n).scatter_(1, y, 1)
    return oh.view(h, w, n).permute(2, 0, 1).unsqueeze(0)


def read_seg(path, factor, short):
    seg = Image.open(path)
    w, h = seg.size
    if w > h:
        th = short
        tw = int(((th * w) / h // 64) * 64)
    else:
        tw = short
        th = int(((tw * h) / w // 64) * 64)
    small = np.array(seg.resize((tw // factor, th // factor), 0))
    small = torch.from_numpy(small.copy()).contiguous().float().unsqueeze(0)
    return to_one_hot(small), np.asarray(seg), seg.getpalette()


def sequences(data):
    with open(os.path.join(data, "ImageSets/2017/val.txt")) as f:
        names = [l.strip() for l in f if l.strip()]
    out = []
    for n in names:
        d = os.path.join(data, "JPEGImages/480p", n)
        frames = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".jpg"))
        out.append((n, frames))
    return out


def ann_of(frame):
    return frame.replace("JPEGImages", "Annotations").replace(".jpg", ".png")


# ---------------------------------------------------------------- a DINO-style forward of a timm ViT
def dino_interpolate(pos_embed, patch, h, w):
    # vision_transformer.py: interpolate_pos_encoding(x, w, h) with its (w, h) = the input's (H, W).
    N = pos_embed.shape[1] - 1
    npatch = (h // patch) * (w // patch)
    if npatch == N and w == h:
        return pos_embed
    cls, pp = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    h0, w0 = h // patch + 0.1, w // patch + 0.1
    pp = F.interpolate(pp.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
                       scale_factor=(h0 / math.sqrt(N), w0 / math.sqrt(N)), mode="bicubic")
    assert int(h0) == pp.shape[-2] and int(w0) == pp.shape[-1]
    pp = pp.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((cls.unsqueeze(0), pp), dim=1)


def sincos_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, gh, gw):
    # MAE's get_2d_sincos_pos_embed on a gh x gw grid: the column coordinate first.
    gw_, gh_ = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, gw_), sincos_1d(dim // 2, gh_)], axis=1)


def dino_tokens(m, x, mode="interpolate"):
    patch = m.patch_embed.proj.kernel_size[0]
    _, _, h, w = x.shape
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat((m.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
    if mode == "interpolate":
        pos = dino_interpolate(m.pos_embed, patch, h, w)
    else:
        table = torch.from_numpy(sincos_2d(t.shape[-1], h // patch, w // patch)).float().unsqueeze(0)
        pos = torch.cat((m.pos_embed[:, :1], table), dim=1)
    t = t + pos
    for blk in m.blocks:
        t = blk(t)
    return m.norm(t)


def pico(seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=0)
    with torch.no_grad():
        m.pos_embed.normal_(0, 0.02)
    return m.eval()


def load_timm(path):
    from timm.models.vision_transformer import VisionTransformer
    sd = load_file(path)
    dim, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = int(math.sqrt(sd["pos_embed"].shape[1] - 1))
    heads = {96: 3, 192: 3, 384: 6, 768: 12}[dim]
    m = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, num_classes=0)
    m.load_state_dict(sd)
    return m.eval()


# ---------------------------------------------------------------- DINO's propagation (label_propagation & co)
def restrict_neighborhood(h, w, size):
    # The quadruple loop of DINO's script, as a comparison of coordinates (the same mask).
    i = torch.arange(h).view(h, 1, 1, 1)
    j = torch.arange(w).view(1, w, 1, 1)
    p = torch.arange(h).view(1, 1, h, 1)
    q = torch.arange(w).view(1, 1, 1, w)
    m = ((i - p).abs() <= size) & ((j - q).abs() <= size)
    return m.float().reshape(h * w, h * w)


def extract_feature(m, frame, patch):
    out = dino_tokens(m, frame.unsqueeze(0))[:, 1:, :]
    h, w = int(frame.shape[1] / patch), int(frame.shape[2] / patch)
    return out[0].reshape(h * w, -1), h, w


def label_propagation(feat_tar, list_feats, list_segs, h, w, mask, topk=5, size=12, temperature=0.1):
    return_feat = feat_tar.T
    n = len(list_feats)
    src = F.normalize(torch.stack(list_feats), dim=1, p=2)
    tar = F.normalize(feat_tar, dim=1, p=2).unsqueeze(0).repeat(n, 1, 1)
    aff = torch.exp(torch.bmm(tar, src) / temperature)
    if size > 0:
        if mask is None:
            mask = restrict_neighborhood(h, w, size).unsqueeze(0).repeat(n, 1, 1)
        aff *= mask
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk, _ = torch.topk(aff, dim=0, k=topk)
    tk_min, _ = torch.min(tk, dim=0)
    aff[aff < tk_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nc, C, h, w = segs.shape
    segs = segs.reshape(nc, C, -1).transpose(2, 1).reshape(-1, C).T
    return torch.mm(segs, aff).reshape(1, C, h, w), return_feat, mask


def norm_mask(mask):
    c, h, w = mask.size()
    for k in range(c):
        mk = mask[k, :, :]
        if mk.max() > 0:
            mk = mk - mk.min()
            mk = mk / mk.max()
            mask[k, :, :] = mk
    return mask


def propagate_video(m, frames, out_dir, short, patch, n_last=7, topk=5, size=12, limit=None, temperature=0.1, norm=True):
    import queue
    first_seg, seg_ori, palette = read_seg(ann_of(frames[0]), patch, short)
    os.makedirs(out_dir, exist_ok=True)
    que = queue.Queue(n_last)
    f1, ori_h, ori_w = read_frame(frames[0], short)
    f1_feat = extract_feature(m, f1, patch)[0].T
    write_indexed(os.path.join(out_dir, os.path.basename(frames[0])[:-4] + ".png"), seg_ori, palette)
    mask = None
    frames = frames if limit is None else frames[:limit]
    for cnt in range(1, len(frames)):
        tar = read_frame(frames[cnt], short)[0]
        feat_tar, h, w = extract_feature(m, tar, patch)
        feats = [f1_feat] + [p[0] for p in list(que.queue)]
        segs = [first_seg] + [p[1] for p in list(que.queue)]
        avg, feat, mask = label_propagation(feat_tar, feats, segs, h, w, mask, topk, size, temperature)
        if que.qsize() == n_last:
            que.get()
        que.put([feat, avg.clone()])
        up = F.interpolate(avg, scale_factor=patch, mode="bilinear", align_corners=False, recompute_scale_factor=False)[0]
        if norm:
            up = norm_mask(up)
        _, seg = torch.max(up, dim=0)
        seg = np.array(seg.squeeze().cpu(), dtype=np.uint8)
        seg = np.array(Image.fromarray(seg).resize((ori_w, ori_h), 0))
        write_indexed(os.path.join(out_dir, os.path.basename(frames[cnt])[:-4] + ".png"), seg, palette)


def write_indexed(path, arr, palette):
    im = Image.fromarray(arr)
    im.putpalette(palette)
    im.save(path, format="PNG")


# ---------------------------------------------------------------- davis2017-evaluation's measures
def seg2bmap(seg):
    seg = seg.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def iou(gt, seg):
    inter = np.sum(gt & seg)
    union = np.sum(gt | seg)
    return 1.0 if np.isclose(union, 0) else inter / union


def f_measure(fg, gt, bound_th=0.008):
    from skimage.morphology import disk
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(fg.shape))
    fb, gb = seg2bmap(fg), seg2bmap(gt)
    se = disk(bound_pix).astype(np.uint8)
    fd = cv2.dilate(fb.astype(np.uint8), se)
    gd = cv2.dilate(gb.astype(np.uint8), se)
    gt_match, fg_match = gb * fd, fb * gd
    n_fg, n_gt = np.sum(fb), np.sum(gb)
    if n_fg == 0 and n_gt > 0:
        p, r = 1, 0
    elif n_fg > 0 and n_gt == 0:
        p, r = 0, 1
    elif n_fg == 0 and n_gt == 0:
        p, r = 1, 1
    else:
        p, r = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    return 0 if p + r == 0 else 2 * p * r / (p + r)


def statistics(v):
    v = np.asarray(v, dtype=np.float64)
    M = np.nanmean(v)
    O = np.nanmean(v > 0.5)
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.uint8)
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return M, O, np.nanmean(bins[0]) - np.nanmean(bins[3])


def jf(data, results):
    out = {"objects": []}
    JM, FM, JR, FR, JD, FD = [], [], [], [], [], []
    for name, frames in sequences(data):
        anns = sorted(f for f in os.listdir(os.path.join(data, "Annotations/480p", name)) if f.endswith(".png"))
        gts = np.stack([np.array(Image.open(os.path.join(data, "Annotations/480p", name, a))) for a in anns]).astype(np.float64)
        gts[gts == 255] = 0
        n_obj = int(np.max(gts[0]))
        ids = [a[:-4] for a in anns][1:-1]
        res = np.stack([np.array(Image.open(os.path.join(results, name, i + ".png"))) for i in ids]).astype(np.float64)
        for o in range(1, n_obj + 1):
            J = [iou(gts[t + 1] == o, res[t] == o) for t in range(len(ids))]
            Fv = [f_measure(res[t] == o, gts[t + 1] == o) for t in range(len(ids))]
            jm, jr, jd = statistics(J)
            fm, fr, fd = statistics(Fv)
            JM.append(jm); JR.append(jr); JD.append(jd); FM.append(fm); FR.append(fr); FD.append(fd)
            out["objects"].append({"sequence": name, "object": o, "j": [float(x) for x in J], "f": [float(x) for x in Fv],
                                   "j_mean": jm, "f_mean": fm, "j_recall": jr, "f_recall": fr, "j_decay": jd, "f_decay": fd})
    out["j_and_f"] = (np.mean(JM) + np.mean(FM)) / 2
    out["j_mean"], out["f_mean"] = np.mean(JM), np.mean(FM)
    out["j_recall"], out["f_recall"], out["j_decay"], out["f_decay"] = np.mean(JR), np.mean(FR), np.mean(JD), np.mean(FD)
    return out


def main():
    cmd = sys.argv[1]
    if cmd == "resize":
        rng = np.random.default_rng(0)
        tensors = {}
        cases = [(854, 480, 832, 480), (160, 72, 128, 64), (37, 23, 64, 41), (100, 60, 51, 29), (20, 9, 7, 5),
                 (64, 33, 128, 66), (71, 40, 71, 24), (300, 200, 19, 13), (11, 7, 33, 21), (129, 65, 64, 32),
                 # exact 2x downscales, which OpenCV computes with INTER_AREA's fast path
                 (128, 64, 64, 32), (854, 480, 427, 240), (6, 2, 3, 1), (90, 34, 45, 17),
                 # 2x on one axis only stays INTER_LINEAR
                 (128, 64, 64, 31)]
        while len(cases) < 45:
            sw, sh, dw, dh = (int(v) for v in rng.integers(2, 90, 4))
            cases.append((sw, sh, dw, dh))
        for i, (sw, sh, dw, dh) in enumerate(cases):
            src = rng.integers(0, 256, size=(sh, sw, 3), dtype=np.uint8)
            # smooth content too, where rounding ties are frequent
            if i % 2:
                yy, xx = np.mgrid[0:sh, 0:sw]
                src[..., 0] = (xx * 255 // max(sw - 1, 1)).astype(np.uint8)
                src[..., 1] = (yy * 255 // max(sh - 1, 1)).astype(np.uint8)
            tensors[f"src_{i}"] = torch.from_numpy(src.copy())
            tensors[f"dst_{i}"] = torch.from_numpy(cv2.resize(src, (dw, dh)).copy())
        save_file(tensors, sys.argv[2])
    elif cmd == "read":
        data, short, patch, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        tensors = {}
        for name, frames in sequences(data):
            for t, f in enumerate(frames):
                tensors[f"frame_{name}_{t}"] = read_frame(f, short)[0].contiguous()
            tensors[f"seg_{name}"] = read_seg(ann_of(frames[0]), patch, short)[0].contiguous()
        save_file(tensors, out)
    elif cmd == "vit":
        out = sys.argv[2]
        os.makedirs(out, exist_ok=True)
        m = pico()
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(out, "pico.safetensors"))
        x = torch.randn(2, 3, 40, 72, generator=torch.Generator().manual_seed(1))
        save_file({"images": x, "interpolate": dino_tokens(m, x, "interpolate").contiguous(),
                   "sincos": dino_tokens(m, x, "sincos").contiguous()}, os.path.join(out, "io.safetensors"))
    elif cmd == "propagate":
        # Optional: n_last topk size temperature norm (DINO's defaults 7 5 12 0.1 1), for the mutation table of
        # tests/davis.rs.
        data, ckpt, short, out = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        n_last, topk, size = (int(v) for v in (sys.argv[6:9] if len(sys.argv) > 8 else (7, 5, 12)))
        temperature = float(sys.argv[9]) if len(sys.argv) > 9 else 0.1
        norm = sys.argv[10] != "0" if len(sys.argv) > 10 else True
        m = load_timm(ckpt)
        patch = m.patch_embed.proj.kernel_size[0]
        for name, frames in sequences(data):
            propagate_video(m, frames, os.path.join(out, name), short, patch, n_last, topk, size, temperature=temperature, norm=norm)
    elif cmd == "propagate-many":
        # One process for many settings (tests/davis.rs's mutation table): VARIANTS is JSON
        # [[name, n_last, topk, size, temperature, norm], ...]; each goes to OUT/<name>/<sequence>/.
        data, ckpt, short, out, variants = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], json.loads(sys.argv[6])
        m = load_timm(ckpt)
        patch = m.patch_embed.proj.kernel_size[0]
        for name, n_last, topk, size, temperature, norm in variants:
            for seq, frames in sequences(data):
                propagate_video(m, frames, os.path.join(out, name, seq), short, patch, n_last, topk, size, temperature=temperature, norm=bool(norm))
    elif cmd == "jf":
        with open(sys.argv[4], "w") as f:
            json.dump(jf(sys.argv[2], sys.argv[3]), f)
    elif cmd == "timm":
        import timm
        torch.manual_seed(0)
        m = timm.create_model(sys.argv[2], pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[3])
    elif cmd == "bench":
        data, ckpt, arch, short, n, out = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
        import tempfile
        m = load_timm(ckpt)
        patch = m.patch_embed.proj.kernel_size[0]
        name, frames = sequences(data)[0]
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            propagate_video(m, frames, d, short, patch, limit=n)
            dt = time.perf_counter() - t0
        with open(out, "w") as f:
            json.dump({"arch": arch, "frames": n, "seconds": dt, "frames_per_second": n / dt, "threads": torch.get_num_threads()}, f)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
