"""torchvision + PIL reference for benches/data_pipeline.rs: the same JPEGs through
Image.open().convert("RGB") + RandomResizedCrop(224, bicubic) + RandomHorizontalFlip + ToTensor + Normalize.

usage: bench_data_pipeline.py IMAGE_FOLDER_SPLIT_DIR [REPEATS]
Prints images/s on one process (torch on 1 thread) and on all cores (a process per core, as DataLoader workers).
"""
import glob
import multiprocessing as mp
import os
import sys
import time

import torch
import torchvision.transforms as T
from PIL import Image

TF = T.Compose([
    T.RandomResizedCrop(224, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
    T.RandomHorizontalFlip(),
    T.ToTensor(),
    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])


def load(path):
    with open(path, "rb") as f:
        return TF(Image.open(f).convert("RGB"))


def decode(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def run(files):
    torch.set_num_threads(1)
    for f in files:
        load(f)
    return len(files)


def best_rate(fn, files, repeats):
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn(files)
        best = max(best, n / (time.perf_counter() - t))
    return best


def main():
    files = sorted(glob.glob(os.path.join(sys.argv[1], "*", "*.jpg")))
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    torch.set_num_threads(1)
    run(files)  # warm the page cache
    one = best_rate(run, files, repeats)
    dec = best_rate(lambda fs: len([decode(f) for f in fs]), files, repeats)
    cores = os.cpu_count()
    chunks = [files[i::cores] for i in range(cores)]
    with mp.Pool(cores) as pool:
        pool.map(run, chunks)
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            n = sum(pool.map(run, chunks))
            best = max(best, n / (time.perf_counter() - t))
    print(f"torchvision+PIL ({Image.__version__}), {len(files)} JPEGs: 1 process {one:.1f} img/s "
          f"({1000 / one:.2f} ms/img); decode only {dec:.1f} img/s; {cores} processes {best:.1f} img/s")


if __name__ == "__main__":
    main()
