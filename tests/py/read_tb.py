"""Reads a folder of TensorBoard event files with TensorBoard's own reader and prints JSON:
{"files": [...], "scalars": {tag: [[step, value], ...]}, "texts": {tag: [[step, text], ...]}, "records": n}.

Every record's framing is also checked here (length and masked CRC32C of header and payload), since
EventAccumulator only logs a corrupt record and stops reading the file.
"""
import glob
import json
import os
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.util import tensor_util


def check_records(path):
    n = 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc_h,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert crc_h == masked_crc32c(header), f"{path}: header crc of record {n}"
        payload = data[pos + 12 : pos + 12 + length]
        assert len(payload) == length, f"{path}: record {n} truncated"
        (crc_d,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert crc_d == masked_crc32c(payload), f"{path}: payload crc of record {n}"
        pos += 16 + length
        n += 1
    return n


def main():
    logdir = sys.argv[1]
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    records = sum(check_records(f) for f in files)
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]}
    texts = {}
    try:
        text_tags = acc.PluginTagToContent("text")
    except KeyError:  # no text summary in the files
        text_tags = {}
    for t in text_tags:
        texts[t] = [[e.step, tensor_util.make_ndarray(e.tensor_proto).reshape(-1)[0].decode("utf-8")] for e in acc.Tensors(t)]
    print(json.dumps({"files": [os.path.basename(f) for f in files], "scalars": scalars, "texts": texts, "records": records}))


if __name__ == "__main__":
    main()
