"""References for the MAE fine-tuning recipe, written from facebookresearch/mae (main_finetune.py,
util/lr_decay.py, util/lr_sched.py) and timm's own code, for tests/finetune_*.rs.

Usage: ref_finetune.py OUT.safetensors
       ref_finetune.py randaug IN.safetensors OUT.safetensors
           IN: `img` [H, W, 3] u8 and metadata `ops` = [[timm op function name, argument], ...]; OUT: `out{i}`,
           the image after timm.data.auto_augment's op i on PIL (bicubic, fill = ImageNet mean in u8).
The first form writes tensors (mixup/cutmix inputs and outputs, loss values) and metadata `result` (JSON): the layer-decay
parameter groups of a timm ViT (pico size), lr values at chosen fractional epochs, and drop-path rates.
"""
import json
import math
import sys

import torch
from safetensors.torch import save_file
import timm.data.mixup as tmix
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer


# --- MAE util/lr_decay.py, as written there ---------------------------------------------------------------------
def get_layer_id_for_vit(name, num_layers):
    if name in ['cls_token', 'pos_embed']:
        return 0
    elif name.startswith('patch_embed'):
        return 0
    elif name.startswith('blocks'):
        return int(name.split('.')[1]) + 1
    else:
        return num_layers


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=[], layer_decay=.75):
    param_group_names = {}
    num_layers = len(model.blocks) + 1
    layer_scales = list(layer_decay ** (num_layers - i) for i in range(num_layers + 1))
    per_param = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            this_decay = 0.
        else:
            this_decay = weight_decay
        layer_id = get_layer_id_for_vit(n, num_layers)
        per_param[n] = {"layer_id": layer_id, "lr_scale": layer_scales[layer_id], "weight_decay": this_decay,
                        "shape": list(p.shape)}
    return per_param


# --- MAE util/lr_sched.py ---------------------------------------------------------------------------------------
def adjust_learning_rate(epoch, lr, min_lr, warmup_epochs, epochs):
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def main(out):
    result = {}
    tensors = {}

    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10,
                              global_pool='avg', drop_path_rate=0.1)
    result["groups"] = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.65)
    result["no_weight_decay"] = sorted(model.no_weight_decay())
    result["drop_path_model"] = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in model.blocks]
    result["drop_path"] = {f"{dp}_{d}": [float(v) for v in torch.linspace(0, dp, d)]
                           for dp in (0.1, 0.2) for d in (4, 12, 24)}

    # lr = blr * 1024 / 256 with MAE's defaults, per iteration: epoch + it / iters.
    lr, min_lr = 5e-4 * 1024 / 256, 1e-6
    ts = [0.0, 0.01, 1.0, 2.5, 4.999, 5.0, 5.5, 30.0, 52.5, 99.0, 99.99]
    result["lr"] = {"lr": lr, "min_lr": min_lr, "warmup": 5, "epochs": 100,
                    "t": ts, "values": [adjust_learning_rate(t, lr, min_lr, 5, 100) for t in ts]}

    # Mixup/CutMix with given lambda and box, through timm's Mixup (mode "batch").
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 10, generator=g)
    y = torch.tensor([3, 0, 7, 7, 1, 9])
    tensors["x"] = x.clone()
    tensors["y"] = y.clone()
    cases = [
        {"lam": 0.7, "cutmix": False},
        {"lam": 0.31, "cutmix": False},
        {"lam": 0.6, "cutmix": True, "box": [1, 6, 2, 9]},
        {"lam": 0.2, "cutmix": True, "box": [0, 8, 0, 4]},
        {"lam": 1.0, "cutmix": False},
    ]
    for i, c in enumerate(cases):
        mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch',
                    label_smoothing=0.1, num_classes=10)
        mix._params_per_batch = lambda c=c: (c["lam"], c["cutmix"])
        if c["cutmix"]:
            yl, yh, xl, xh = c["box"]
            tmix.rand_bbox = lambda img_shape, lam, margin=0., count=None, b=(yl, yh, xl, xh): b
        xm, target = mix(x.clone(), y.clone())
        tensors[f"mix{i}_x"] = xm.contiguous()
        tensors[f"mix{i}_target"] = target.contiguous()
        # The lam used for the targets (after the area correction for cutmix).
        c["lam_used"] = float(target[0, y[0]] - target[0].min()) / (1 - 0.1) if y[0] != y.flip(0)[0] else None
    result["mix_cases"] = cases
    for s in (0.0, 0.1, 0.25):
        tensors[f"target_s{s}"] = tmix.mixup_target(y, 10, lam=0.65, smoothing=s).contiguous()

    # Losses.
    logits = torch.randn(6, 10, generator=g)
    tensors["logits"] = logits
    tensors["soft_ce"] = SoftTargetCrossEntropy()(logits, tensors["mix0_target"]).reshape(1)
    tensors["ls_ce"] = LabelSmoothingCrossEntropy(0.1)(logits, y).reshape(1)

    save_file(tensors, out, metadata={"result": json.dumps(result)})


def randaug(inp, out):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    from safetensors import safe_open
    import timm.data.auto_augment as aa
    img = Image.fromarray(load_file(inp)["img"].numpy())
    with safe_open(inp, "pt") as f:
        ops = json.loads(f.metadata()["ops"])
    kw = dict(fillcolor=(124, 116, 104), resample=Image.BICUBIC)
    res = {}
    for i, (name, arg) in enumerate(ops):
        fn = getattr(aa, name)
        if name in ("posterize", "solarize", "solarize_add"):
            arg = int(arg)  # timm's level functions give ints for these
        o = fn(img, **kw) if arg is None else fn(img, arg, **kw)
        res[f"out{i}"] = torch.from_numpy(np.asarray(o).copy())
    save_file(res, out)


if __name__ == "__main__":
    if sys.argv[1] == "randaug":
        randaug(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1])
