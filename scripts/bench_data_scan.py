"""The measurements of scripts/bench_data_scan.sh.

Scan: for each tree size, a tree `train/n%08d/n%08d_%d.JPEG` of empty files in 1000 class folders (ImageNet's
shape) is made in /tmp, left 3 s (so that lmim-bench keeps its index: folders changed within 2 s of a scan are
not indexed) and walked once untimed (warm caches, as a second job start finds them). Then, alternating, each
`--reps` times: `lmim-bench data info --split train --rescan` (the first open: walk, one stat per file for the
fingerprint, the index written), `lmim-bench data info --split train` (the second open: the index read back),
and torchvision's `ImageFolder(root/train)` in a fresh Python. Wall times are of the whole process and of the
open alone (lmim-bench's `open_seconds`; torchvision's constructor timed in the process); peak RSS is the
process's (`wait4` rusage), with `import torchvision` alone beside it. Metadata calls are counted once per tool
with `strace -f -c`. Loader: `data synth` 500x375 JPEGs, `data pack`, then `bench loader` (decode +
RandomResizedCrop + flip + normalise, 1 worker) on the folder and on the shards, alternating.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.environ["LMIM_BENCH_BIN"]
STAT_CALLS = "statx,newfstatat,fstatat64,stat,lstat,fstat"
TV_OPEN = """
import json, sys, time
t0 = time.perf_counter()
import torchvision
t1 = time.perf_counter()
ds = torchvision.datasets.ImageFolder(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "open_s": t2 - t1, "n": len(ds.samples)}))
"""
TV_IMPORT = "import torchvision"


def run(cmd, env=None):
    """(stdout, wall seconds, peak RSS MiB) of a child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed: {err.decode()[-2000:]}")
    return out.decode(), wall, ru.ru_maxrss / 1024


def make_tree(root, n):
    per, extra = divmod(n, 1000)
    t0 = time.perf_counter()
    for c in range(1000):
        d = os.path.join(root, "train", f"n{c:08d}")
        os.makedirs(d)
        for i in range(per + (c < extra)):
            os.close(os.open(os.path.join(d, f"n{c:08d}_{i}.JPEG"), os.O_CREAT | os.O_WRONLY, 0o644))
    return time.perf_counter() - t0


def stat_calls(cmd, env=None):
    """Metadata system calls of a run (strace -f -c)."""
    with tempfile.NamedTemporaryFile(suffix=".strace") as f:
        subprocess.run(["strace", "-f", "-c", "-o", f.name, "-e", f"trace={STAT_CALLS}"] + cmd, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        total = 0
        for line in open(f.name):
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m and m.group(2) != "total":
                total += int(m.group(1))
        return total


def scan(n, reps):
    root = tempfile.mkdtemp(prefix=f"lmim-scan-{n}-", dir="/tmp")
    cache = tempfile.mkdtemp(prefix="lmim-scan-cache-", dir="/tmp")
    env = dict(os.environ, LMIM_CACHE=cache)
    try:
        made = make_tree(root, n)
        time.sleep(3)
        subprocess.run(["find", root], stdout=subprocess.DEVNULL, check=True)
        info = [BIN, "data", "info", "--json", "--split", "train", "--data", root]
        tv = [sys.executable, "-c", TV_OPEN, os.path.join(root, "train")]
        rows = {"first": [], "second": [], "tv": [], "tv_import": [], "bin_start": []}
        start = {"tv_import": [sys.executable, "-c", TV_IMPORT], "bin_start": [BIN, "--version"]}
        for _ in range(reps):
            for key, cmd in [("first", info + ["--rescan"]), ("second", info), ("tv", tv)] + list(start.items()):
                out, wall, rss = run(cmd, env)
                if key in ("first", "second"):
                    split = json.loads(out)["splits"]["train"]
                    assert split["fingerprint"]["num_files"] == n
                    assert split["index"] == ("scan" if key == "first" else "cache"), split["index"]
                    inner = split["open_seconds"]
                elif key == "tv":
                    j = json.loads(out)
                    assert j["n"] == n
                    inner = j["open_s"]
                else:
                    inner = 0.0
                rows[key].append((wall, inner, rss))
        base = {k: stat_calls(c, env) for k, c in start.items()}
        # Beyond what starting the process costs (loading libtorch; Python's imports).
        calls = {"first": stat_calls(info + ["--rescan"], env) - base["bin_start"],
                 "second": stat_calls(info, env) - base["bin_start"], "tv": stat_calls(tv, env) - base["tv_import"]}
        index_mb = sum(os.path.getsize(os.path.join(cache, "data-index", f)) for f in os.listdir(os.path.join(cache, "data-index"))) / 1e6
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), max(r[2] for r in v)) for k, v in rows.items()}
    return {"n": n, "made_s": made, "med": med, "calls": calls, "index_mb": index_mb}


def loader(reps):
    tmp = tempfile.mkdtemp(prefix="lmim-loader-", dir="/tmp")
    env = dict(os.environ, LMIM_CACHE=os.path.join(tmp, "cache"))
    try:
        folder, packed = os.path.join(tmp, "folder"), os.path.join(tmp, "packed")
        run([BIN, "data", "synth", "--out", folder, "--classes", "8", "--train-per-class", "32", "--val-per-class", "1",
             "--size", "500x375"], env)
        run([BIN, "data", "pack", "--data", folder, "--split", "train", "--out", packed, "--shard-size", "8MB"], env)
        shards = len([f for f in os.listdir(os.path.join(packed, "train")) if f.endswith(".tar")])
        res = {"folder": [], "shards": []}
        for _ in range(reps):
            for key, d in [("folder", folder), ("shards", packed)]:
                out, _, _ = run([BIN, "bench", "loader", "--data", d, "--size", "224", "--batch-size", "32", "--workers", "1",
                                 "--warmup", "1", "--steps", "8"], dict(env, OMP_NUM_THREADS="1"))
                res[key].append(json.loads(out)["items_per_s"])
        return {"shards": shards, "folder": statistics.median(res["folder"]), "packed": statistics.median(res["shards"]),
                "all": res}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[130000, 1331000])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/data_scan.md")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    results = [scan(n, a.reps) for n in a.sizes]
    ld = loader(a.reps)
    ld["load"] = (load0, os.getloadavg()[0])
    json.dump({"scan": results, "loader": ld}, open(a.out.replace(".md", ".json"), "w"), indent=1)
    write(a.out, results, ld, a.reps)


def write(path, results, ld, reps):
    import torchvision
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    profile = "release" if "/release/" in BIN else "debug (crate opt-level 1, dependencies opt-level 3)"
    L = [
        "# Opening ImageNet-sized data: lmim-bench's index vs torchvision's ImageFolder; shards vs folder",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, local disk, warm page and dentry caches; {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC. "
        f"`bash scripts/bench_data_scan.sh` (scripts/bench_data_scan.py says how each number is taken); lmim-bench {profile} build, "
        f"torchvision {torchvision.__version__}, Python {platform.python_version()}; load average {ld['load'][0]:.1f} at the start, {ld['load'][1]:.1f} at the end "
        "(the machine is shared with other builds, so compare the rows of one run). "
        f"Medians of {reps} alternating runs; peak RSS the largest. "
        "Trees: 1000 class folders of empty `.JPEG` files (`train/n%08d/n%08d_%d.JPEG`), made for the run and deleted after it.",
        "",
        "Stat-family calls (statx, newfstatat, ...) are those beyond starting the process: `lmim-bench --version` for "
        "lmim-bench (the dynamic loader opening libtorch), `import torchvision` for torchvision; the start-up rows give "
        "the wall time and peak RSS of that alone (most of each process's RSS is its libraries: libtorch for both).",
        "",
        "| files | tool | process wall s | open s | peak RSS MiB | stat-family calls |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        m, c, n = r["med"], r["calls"], r["n"]
        L.append(f"| {n:,} | lmim-bench, first open (walk + sizes + index written) | {m['first'][0]:.2f} | {m['first'][1]:.2f} | {m['first'][2]:.0f} | {c['first']:,} |")
        L.append(f"| {n:,} | lmim-bench, second open (index read) | {m['second'][0]:.2f} | {m['second'][1]:.2f} | {m['second'][2]:.0f} | {c['second']:,} |")
        L.append(f"| {n:,} | torchvision `ImageFolder` | {m['tv'][0]:.2f} | {m['tv'][1]:.2f} | {m['tv'][2]:.0f} | {c['tv']:,} |")
        L.append(f"| {n:,} | (`lmim-bench --version`: start-up alone) | {m['bin_start'][0]:.2f} | - | {m['bin_start'][2]:.0f} | - |")
        L.append(f"| {n:,} | (`import torchvision`: start-up alone) | {m['tv_import'][0]:.2f} | - | {m['tv_import'][2]:.0f} | - |")
    L += ["", "Ratios (torchvision / lmim-bench; above 1: lmim-bench is faster or smaller):", ""]
    for r in results:
        m = r["med"]
        L.append(f"- {r['n']:,} files: first open {m['tv'][1] / m['first'][1]:.2f}x (open alone), {m['tv'][0] / m['first'][0]:.2f}x (process); "
                 f"second open {m['tv'][1] / m['second'][1]:.1f}x (open alone), {m['tv'][0] / m['second'][0]:.1f}x (process); "
                 f"peak RSS {m['tv'][2] / m['first'][2]:.2f}x (first open), {m['tv'][2] / m['second'][2]:.2f}x (second), "
                 f"above start-up {(m['tv'][2] - m['tv_import'][2]) / max(m['first'][2] - m['bin_start'][2], 1):.2f}x (first) and "
                 f"{(m['tv'][2] - m['tv_import'][2]) / max(m['second'][2] - m['bin_start'][2], 1):.2f}x (second); index file {r['index_mb']:.1f} MB; tree made in {r['made_s']:.0f} s.")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        f = b["n"] / a["n"]
        L += ["", f"Scaling from {a['n']:,} to {b['n']:,} files ({f:.1f}x): open time x{b['med']['first'][1] / a['med']['first'][1]:.1f} (lmim-bench first), "
              f"x{b['med']['second'][1] / a['med']['second'][1]:.1f} (second), x{b['med']['tv'][1] / a['med']['tv'][1]:.1f} (torchvision); "
              f"peak RSS x{b['med']['first'][2] / a['med']['first'][2]:.1f}, x{b['med']['second'][2] / a['med']['second'][2]:.1f}, x{b['med']['tv'][2] / a['med']['tv'][2]:.1f}."]
    L += [
        "",
        "## Loader from tar shards vs from the folder, per core",
        "",
        f"The same 256 generated 500x375 JPEGs (`data synth`, quality 90), as a folder and packed by `data pack` into {ld['shards']} shards; "
        "`bench loader --size 224 --batch-size 32 --workers 1` (decode + RandomResizedCrop(224) + flip + normalise, one thread, "
        f"`OMP_NUM_THREADS=1`), 8 timed batches after 1 warm-up, medians of {reps} alternating runs.",
        "",
        "| source | img/s, 1 core |",
        "|---|---|",
        f"| folder (one file per image: open, read, close) | {ld['folder']:.1f} |",
        f"| tar shards (one `pread` per image from an open shard) | {ld['packed']:.1f} |",
        "",
        f"Shards / folder: {ld['packed'] / ld['folder']:.2f}x. All runs (img/s): folder {', '.join(f'{x:.1f}' for x in ld['all']['folder'])}; "
        f"shards {', '.join(f'{x:.1f}' for x in ld['all']['shards'])}.",
    ]
    open(path, "w").write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
