"""Tar interop for tests/data_loader.rs: writes WebDataset shards the way Python's tarfile (and webdataset's
TarWriter, which uses it) does, as existing ImageNet shards are (`<key>.jpg` + `<key>.cls` + `<key>.json`, no
classes file), and lists the members of lmim-bench's shards with tarfile.

usage: wds_shards.py write SPLIT_DIR OUT_DIR PER_SHARD   (SPLIT_DIR: <class>/<file>.jpg)
       wds_shards.py list SHARD_DIR OUT_JSON
"""
import io
import json
import os
import sys
import tarfile


def write(split_dir, out_dir, per_shard):
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    samples = []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(split_dir, c))):
            samples.append((c, f, ci))
    os.makedirs(out_dir)
    for s in range(0, len(samples), per_shard):
        # tarfile's default format is PAX (Python 3.8+).
        with tarfile.open(os.path.join(out_dir, f"imagenet1k-train-{s // per_shard:04d}.tar"), "w") as tar:
            for c, f, ci in samples[s:s + per_shard]:
                key = f"{c}_{f.split('.')[0]}"
                data = open(os.path.join(split_dir, c, f), "rb").read()
                for name, payload in [(f"{key}.jpg", data), (f"{key}.cls", str(ci).encode()),
                                      (f"{key}.json", json.dumps({"class": c}).encode())]:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def list_members(shard_dir, out_json):
    out = {}
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shard_dir, name)) as tar:
                out[name] = [[m.name, m.size] for m in tar.getmembers()]
    json.dump(out, open(out_json, "w"))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        list_members(sys.argv[2], sys.argv[3])
