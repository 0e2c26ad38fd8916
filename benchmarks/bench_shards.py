"""Shards vs. reading the original PNGs: build rate, read rate per core, and memory while streaming.

Measured side by side in one run on phantom NIH-format 1024-px PNGs (shards.synth):
  (a) `shards.writer.build` at --size 256 with 1 and with 2 workers: images/s per worker, speed-up;
  (b) one core reading 256-px shards with `shards.stream.make_loader` vs. a map-style torch Dataset
      over the original 1024-px PNGs that does what torchxrayvision's NIH_Dataset does per sample
      (PIL open, convert to L, resize to 256) - goal >= 10x images/s;
  (c) peak RSS (main + worker process) streaming one train epoch of N and of 10*N images, each in
      a fresh subprocess - goal <= 1.2x growth.

    python benchmarks/bench_shards.py [--images 24] [--repeat 4] [--epoch 500]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from shards.stream import make_loader
from shards.synth import synth_nih

SIZE = 256


BUILD_SCRIPT = """
import dataclasses, json, resource, sys, time
from pathlib import Path
from shards.sources import get_source
from shards.writer import build
src, out, workers, repeat, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
items = [it for it in get_source("nih").scan(src) if not hasattr(it, "reason")]
# each phantom listed `repeat` times under distinct keys: more work from the same files
scan = [dataclasses.replace(it, record=dataclasses.replace(it.record, key=f"{it.record.key}_r{r}"))
        for r in range(repeat) for it in items]
def cpu():
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
t0, c0 = time.perf_counter(), cpu()
result = build(scan, out, source="nih", size=size, workers=workers, max_count=8, progress=False)
print(json.dumps({"images": result.samples, "seconds": time.perf_counter() - t0, "cpu": cpu() - c0}))
"""


def bench_build(src: Path, work: Path, repeat: int) -> dict:
    """Each build in a fresh `python -c` process, as the CLI runs (spawned workers import little)."""
    rows = {}
    for workers in (1, 2):
        proc = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(src), str(work / f"build-w{workers}"),
                               str(workers), str(repeat), str(SIZE)], check=True, capture_output=True, text=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows[workers] = row | {"rate": row["images"] / row["seconds"], "cpu_rate": row["images"] / row["cpu"]}
    return rows


class OriginalPNGs(Dataset):
    """The usual alternative: one full-size PNG per sample, decoded and resized on every access."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("L").resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def bench_read(src: Path, shard_dir: Path, rounds: int = 6, slice_s: float = 0.5) -> dict:
    """Alternate short slices of both readers, so that a change in machine load hits both alike.

    Rates are images per CPU second of this process: one core (no workers, one torch thread).
    """
    torch.set_num_threads(1)
    paths = sorted((src / "images").glob("*.png"))
    original = DataLoader(OriginalPNGs(paths, SIZE), batch_size=16, num_workers=0)
    stream = make_loader(f"{shard_dir}/*.tar", mode="eval", batch_size=32, num_workers=0)
    assert next(iter(stream))["image"].shape[-1] == SIZE
    readers = {"original": (original, lambda b: b.shape[0]), "shards": (stream, lambda b: b["image"].shape[0])}
    iters = {name: iter(()) for name in readers}
    totals = {name: {"images": 0, "cpu": 0.0, "wall": 0.0} for name in readers}
    for _ in range(rounds):
        for name, (loader, count) in readers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < slice_s:
                batch = next(iters[name], None)
                if batch is None:
                    iters[name] = iter(loader)
                    continue
                totals[name]["images"] += count(batch)
            totals[name]["cpu"] += time.process_time() - c0
            totals[name]["wall"] += time.perf_counter() - t0
    return {name: {"cpu_rate": t["images"] / t["cpu"], "rate": t["images"] / t["wall"], "images": t["images"]}
            for name, t in totals.items()}


RSS_SCRIPT = """
import json, resource, sys
from shards.stream import make_loader
urls, n = sys.argv[1], int(sys.argv[2])
loader = make_loader(urls, mode="train", batch_size=32, epoch_size=n, num_workers=1, shuffle_buffer=500)
seen = sum(b["image"].shape[0] for b in loader)
me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
del loader  # joins the worker, so its peak RSS is in RUSAGE_CHILDREN
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seen": seen, "rss_mb": (me + kids) / 1024}))
"""


def bench_rss(shard_dir: Path, n: int) -> dict:
    out = {}
    for k in (n, 10 * n):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, f"{shard_dir}/*.tar", str(k)], check=True,
                              capture_output=True, text=True)
        out[k] = json.loads(proc.stdout.strip().splitlines()[-1]) | {"seconds": time.perf_counter() - t0}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24, help="distinct 1024-px phantoms to generate")
    ap.add_argument("--repeat", type=int, default=8, help="each phantom is built this many times in (a)")
    ap.add_argument("--copies", type=int, default=8, help="shard copies for the read tests (b, c)")
    ap.add_argument("--epoch", type=int, default=500, help="N for (c): epochs of N and 10*N images")
    args = ap.parse_args(argv)

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        src = synth_nih(work / "nih", args.images, size=1024, seed=0)
        print(f"# generated {args.images} phantom 1024-px PNGs in {time.perf_counter() - t0:.1f} s", flush=True)

        b = bench_build(src, work, args.repeat)
        built = work / "build-w1"
        reads = work / "read"
        reads.mkdir()
        for c in range(args.copies):  # more samples to stream: copies of the built shards
            for p in sorted(built.glob("*.tar")):
                shutil.copy(p, reads / f"c{c}-{p.name}")
        r = bench_read(src, reads)
        m = bench_rss(reads, args.epoch)

    w1, w2 = b[1], b[2]
    same = "identical" if w1["images"] == w2["images"] else "DIFFERENT"
    speedup = w2["rate"] / w1["rate"]
    o, s = r["original"], r["shards"]
    ratio = s["cpu_rate"] / o["cpu_rate"]
    n, n10 = args.epoch, 10 * args.epoch
    growth = m[n10]["rss_mb"] / m[n]["rss_mb"]
    nih = 112_120
    print()
    print(f"load average during the run: {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(rates per CPU second are robust to sharing; wall-clock rates and the speed-up are not)")
    print()
    print("| measurement | per CPU second | wall clock | note |")
    print("|---|---|---|---|")
    print(f"| (a) build, 1 worker | {w1['cpu_rate']:.1f} img/s | {w1['rate']:.1f} img/s | {w1['images']} images, "
          f"1024 px -> {SIZE} px |")
    print(f"| (a) build, 2 workers | {w2['cpu_rate']:.1f} img/s per worker | {w2['rate']:.1f} img/s total | "
          f"wall speed-up {speedup:.2f}x from 1 to 2 workers; sample counts {same} |")
    print(f"| (b) read original 1024-px PNGs (PIL open, convert, resize) | {o['cpu_rate']:.1f} img/s | "
          f"{o['rate']:.1f} img/s | map-style Dataset as torchxrayvision's NIH_Dataset, one core |")
    print(f"| (b) read {SIZE}-px shards (make_loader) | {s['cpu_rate']:.1f} img/s | {s['rate']:.1f} img/s | "
          f"{ratio:.1f}x per core (goal >= 10x) |")
    print(f"| (c) peak RSS, epoch of {n} | {m[n]['rss_mb']:.0f} MB | | {m[n]['seen']} images, main + 1 worker |")
    print(f"| (c) peak RSS, epoch of {n10} | {m[n10]['rss_mb']:.0f} MB | | {m[n10]['seen']} images, "
          f"growth {growth:.2f}x (goal <= 1.2x) |")
    print(f"| projection: build NIH-14 ({nih:,} images) on 16 cores | {nih / (w2['cpu_rate'] * 16) / 60:.0f} min | | "
          f"{SIZE} px, at the per-worker CPU rate |")
    print(f"| projection: loader cores per 1,000 img/s of GPU demand | {1000 / s['cpu_rate']:.1f} cores | | "
          f"original PNGs: {1000 / o['cpu_rate']:.0f} cores |")
    print()
    efficiency = w2["cpu_rate"] / w1["cpu_rate"]
    print(f"shards read {ratio:.1f}x faster per core than original PNGs; 2 build workers each run at "
          f"{efficiency:.0%} of 1 worker's per-core rate (wall speed-up {speedup:.2f}x at load {load0:.1f}); "
          f"RSS growth {growth:.2f}x from {n} to {n10} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
