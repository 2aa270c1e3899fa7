"""Writes hostile or unsupported PyTorch checkpoints for tests/untrusted_files.rs.

Usage: python make_untrusted_pth.py OUT_DIR

- evil_global.pth: a valid state dict plus an object whose unpickling would call `os.system` (pickled as the
  global `posix.system`); running it would create OUT_DIR/pwned.
- huge_storage.pth: a storage whose persistent id claims 2**40 float32 elements, with 16 bytes of data.
- stride0_bomb.pth: a 4-element storage viewed as 100000 x 100000 with strides (0, 0) (40 GB once materialised).
- legacy.pth: the legacy (not zip) torch.save format.
"""
import collections
import io
import os
import pickle
import sys
import zipfile

import torch


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class FakeStorage:
    def __init__(self, numel):
        self.numel = numel


class FakeTensor:
    """Pickles as torch.save pickles a tensor, with any storage size, offset, size and stride."""

    def __init__(self, storage, size, stride):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False, collections.OrderedDict()))


class TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def write_archive(path, obj, storage_bytes):
    """A zip laid out as torch.save lays it out (stored entries under `archive/`)."""
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", storage_bytes)
        z.writestr("archive/version", "3\n")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    w = torch.arange(4, dtype=torch.float32)

    torch.save({"w": w, "x": Evil(os.path.join(out, "pwned"))}, os.path.join(out, "evil_global.pth"))

    data = w.numpy().tobytes()
    write_archive(os.path.join(out, "huge_storage.pth"), {"w": FakeTensor(FakeStorage(2**40), (2**40,), (1,))}, data)
    write_archive(os.path.join(out, "stride0_bomb.pth"),
                  {"w": FakeTensor(FakeStorage(4), (100000, 100000), (0, 0))}, data)

    torch.save({"w": w}, os.path.join(out, "legacy.pth"), _use_new_zipfile_serialization=False)


if __name__ == "__main__":
    main()
