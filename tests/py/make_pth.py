"""Writes PyTorch checkpoints for the `.pth` import tests (tests/pth_import.rs).

Usage: python make_pth.py OUT_DIR

For every `NAME.pth` written, `NAME.safetensors` holds the tensors the importer must find in it (same names, dtypes,
shapes and values, made contiguous). Files that must be rejected are written as `bad_*.pth` without a reference.
"""
import argparse
import collections
import io
import os
import sys
import zipfile

import numpy as np
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer


def reference(out, name, tensors):
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, os.path.join(out, name + ".safetensors"))


def save(out, name, obj, expected, **kwargs):
    torch.save(obj, os.path.join(out, name + ".pth"), **kwargs)
    reference(out, name, expected)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)

    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=0)
    sd = vit.state_dict()  # an OrderedDict with a `_metadata` attribute: pickled with BUILD
    expected = dict(sd)

    # A plain state dict.
    save(out, "plain", sd, expected)

    # Nested under "model" with training state around it, as MAE / DeiT scripts save.
    ns = argparse.Namespace(model="vit_tiny", lr=1.5e-4, input_size=32, mask_ratio=0.75, device="cuda", seed=0,
                            blr=None, norm_pix_loss=True, layers=[1, 2, 3])
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    save(out, "nested_model", {"model": sd, "optimizer": opt.state_dict(), "epoch": 3, "args": ns,
                               "scaler": {"scale": 65536.0, "growth_tracker": 0}, "best": np.float64(0.5)}, expected)

    # Under "state_dict" with the `module.` prefix of DistributedDataParallel, saved through a file object so the
    # archive's top folder is `archive/`.
    ddp = collections.OrderedDict(("module." + k, v) for k, v in sd.items())
    buf = io.BytesIO()
    torch.save({"state_dict": ddp, "epoch": 1, "best_acc1": torch.tensor(0.25)}, buf)
    with open(os.path.join(out, "ddp_state_dict.pth"), "wb") as f:
        f.write(buf.getvalue())
    reference(out, "ddp_state_dict", ddp)

    # "module" comes before "model_state" in the order of preference.
    small = {"w": torch.randn(3, 2), "b": torch.randn(3)}
    save(out, "priority", {"model_state": {"x": torch.randn(4)}, "module": small, "loose": torch.randn(2)}, small)

    # Dtypes, scalars and empty tensors.
    dtypes = {
        "f32": torch.randn(5, 3),
        "f16": torch.randn(4, 4).half(),
        "bf16": torch.randn(7).bfloat16(),
        "f64": torch.randn(2, 3, dtype=torch.float64),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(10, dtype=torch.int32) * -3,
        "i16": torch.arange(6, dtype=torch.int16),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, False, True, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
    }
    save(out, "dtypes", dtypes, dtypes)

    # Views: non-contiguous, offsets into a shared storage, zero strides; nested dicts; non-tensor values.
    base = torch.randn(6, 8)
    ones = torch.randn(3, 1)
    views = {
        "base": base,
        "transposed": base.t(),
        "row": base[2],
        "block": base[1:4, 2:7],
        "every_other": base[::2, 1::3],
        "expanded": ones.expand(3, 5),
        "half_view": torch.randn(4, 6).half()[1:, ::2],
        "nested": {"inner": {"x": base[5], "y": torch.arange(3)}, "n": 7},
        "note": "not a tensor",
        "count": 5,
        "ratio": 0.5,
        "flag": None,
        "shape": torch.Size([2, 3]),
        "np_scalar": np.float32(1.5),
        "np_array": np.arange(4),
        "pair": (1, "a"),
    }
    views_expected = {k: v for k, v in views.items() if isinstance(v, torch.Tensor)}
    views_expected["nested.inner.x"] = views["nested"]["inner"]["x"]
    views_expected["nested.inner.y"] = views["nested"]["inner"]["y"]
    save(out, "views", views, views_expected)

    # Other pickle protocols (protocol 4 adds FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL, ...).
    few = {"a": torch.randn(3, 4).t(), "b": torch.arange(5), "c": torch.randn(2).half()}
    for proto in (1, 3, 4, 5):
        save(out, f"protocol{proto}", few, few, pickle_protocol=proto)


    # A big-endian archive, as written on a big-endian machine: byteorder says `big` and the storage bytes are
    # swapped. All storages are float32 so each 4-byte word is swapped.
    be = {"w": torch.randn(3, 5), "v": torch.randn(4)}
    buf = io.BytesIO()
    torch.save(be, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(os.path.join(out, "big_endian.pth"), "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
            dst.writestr(info.filename, data)
    reference(out, "big_endian", be)

    # Files that must be rejected.
    torch.save(vit, os.path.join(out, "bad_whole_module.pth"))  # a whole pickled model: globals outside the allow-list
    torch.save(small, os.path.join(out, "bad_legacy.pth"), _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(os.path.join(out, "bad_no_pickle.pth"), "w") as z:
        z.writestr("archive/version", "3\n")
    torch.save({"note": "no tensors here", "n": 1}, os.path.join(out, "bad_no_tensors.pth"))


if __name__ == "__main__":
    main()
