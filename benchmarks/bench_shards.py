"""Images/s per loader core: PNG shards, raw shards, a map-style PNG-file baseline and decoding alone.

One run, the same images (phantom NIH-format chest X-rays, shards.synth, preprocessed once by
`shards.writer.build`), 224-px uint8 batches out of every reader; one core each (no workers, one torch
thread), images per CPU second of this process, measured in alternating short slices so that a change
in machine load hits every reader alike:
  (a) PNG shards stored at 224 px (`make_loader`, the project's PNG decoder);
  (b) raw shards stored at 224 px (`build --encoding raw`: uint8 .npy, no decoding);
  (c) a map-style torch Dataset over one PNG file per image at the same 224 px (PIL open + convert, as
      torchxrayvision-style datasets do), same uint8 output;
  (d) decoding alone, on the same 224-px PNG bytes in memory: the project's fast path,
      torchvision.io.decode_png (libpng) and PIL, each checked pixel-equal to the stored image;
  (e) resizing where it is not stored at the training size: PNG shards stored at 256 px resized per
      sample (PIL bilinear) to 224, and the original 1024-px PNG files resized per sample (the old baseline).
From (a)-(c) it derives the loader cores N GPUs need at a stated model rate (--model-rate, per GPU),
then measures peak RSS (main + worker process) streaming train epochs of N and 10*N raw images.

    python benchmarks/bench_shards.py [--images 16] [--repeat 24] [--gpus 8] [--model-rate 3000]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from runkit import cpu
from shards.stream import _decode_up_png, decode_npy, make_loader
from shards.synth import synth_nih

SIZE = 224


def build_all(src: Path, work: Path, repeat: int) -> dict:
    """The same scan built four ways; returns {name: (folder, images per build CPU second)}."""
    from shards.sources import get_source
    from shards.writer import build

    items = [it for it in get_source("nih").scan(src) if not hasattr(it, "reason")]
    scan = [dataclasses.replace(it, record=dataclasses.replace(it.record, key=f"{it.record.key}_r{r}"))
            for r in range(repeat) for it in items]
    out = {}
    for name, size, enc in (("png", SIZE, "png"), ("raw", SIZE, "raw"), ("png256", 256, "png")):
        c0 = time.process_time()
        res = build(scan, work / name, source="nih", size=size, workers=1, max_count=200, progress=False,
                    encoding=enc)
        out[name] = (work / name, res.samples / (time.process_time() - c0))
    return out


class PNGFiles(Dataset):
    """One PNG file per image, decoded on every access (PIL open, convert to L), optionally resized."""

    def __init__(self, paths: list[Path], size: int | None = None):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("L")
        if self.size is not None and img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img))[None]


def write_png_files(shard_dir: Path, out: Path) -> list[Path]:
    """The shards' 224-px pixels as one PIL-written PNG file each (what a folder-of-PNGs data set holds)."""
    out.mkdir()
    paths = []
    for b in make_loader(f"{shard_dir}/*.tar", mode="eval", batch_size=64, num_workers=0):
        for key, img in zip(b["key"], b["image"]):
            paths.append(out / f"{key}.png")
            Image.fromarray(img[0].numpy()).save(paths[-1])
    return paths


def alternate(readers: dict, rounds: int, slice_s: float) -> dict:
    """images per CPU second (and per wall second) of each reader, in alternating slices on one core."""
    iters = {name: iter(()) for name in readers}
    totals = {name: {"images": 0, "cpu": 0.0, "wall": 0.0} for name in readers}
    for _ in range(rounds):
        for name, (make_iter, count) in readers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < slice_s:
                item = next(iters[name], None)
                if item is None:
                    iters[name] = make_iter()
                    continue
                totals[name]["images"] += count(item)
            totals[name]["cpu"] += time.process_time() - c0
            totals[name]["wall"] += time.perf_counter() - t0
    return {name: {"cpu_rate": t["images"] / t["cpu"], "rate": t["images"] / t["wall"], "images": t["images"]}
            for name, t in totals.items()}


def sample_bytes(shard_dir: Path, ext: str, limit: int = 256) -> list[bytes]:
    import tarfile

    out = []
    for p in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(p) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(ext)]
        if len(out) >= limit:
            break
    return out[:limit]


def decoders(pngs: list[bytes], raws: list[bytes]) -> dict:
    """Each decoder on the same bytes, after checking every output equals the stored pixels."""
    import torchvision.io as tio

    def tv(b):
        return tio.decode_png(torch.frombuffer(bytearray(b), dtype=torch.uint8))[0].numpy()

    def pil(b):
        with Image.open(io.BytesIO(b)) as im:
            return np.asarray(im)

    fns = {"project fast path (zlib + cumsum)": _decode_up_png, "torchvision.io.decode_png": tv, "PIL": pil}
    truth = [decode_npy(r) for r in raws]
    for name, fn in fns.items():
        if not all(np.array_equal(fn(b), t) for b, t in zip(pngs, truth)):
            raise AssertionError(f"{name} does not give the stored pixels")
    small = [Image.fromarray(np.asarray(Image.fromarray(t).resize((256, 256)))) for t in truth[:64]]
    readers = {name: (lambda fn=fn: map(fn, pngs), lambda _: 1) for name, fn in fns.items()}
    readers["raw .npy view (decode_npy)"] = (lambda: map(decode_npy, raws), lambda _: 1)
    readers["PIL bilinear resize 256 -> 224 alone"] = (
        lambda: (im.resize((SIZE, SIZE), Image.Resampling.BILINEAR) for im in small), lambda _: 1)
    return alternate(readers, rounds=4, slice_s=0.25)


RSS_SCRIPT = """
import json, resource, sys
from shards.stream import make_loader
urls, n = sys.argv[1], int(sys.argv[2])
loader = make_loader(urls, mode="train", batch_size=64, epoch_size=n, num_workers=1, shuffle_buffer=1000)
seen = sum(b["image"].shape[0] for b in loader)
me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
del loader  # joins the worker, so its peak RSS is in RUSAGE_CHILDREN
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seen": seen, "rss_mb": (me + kids) / 1024}))
"""


def bench_rss(shard_dir: Path, n: int) -> dict:
    out = {}
    for k in (n, 10 * n):
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, f"{shard_dir}/*.tar", str(k)], check=True,
                              capture_output=True, text=True)
        out[k] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16, help="distinct 1024-px phantoms to generate")
    ap.add_argument("--repeat", type=int, default=24, help="each phantom is built this many times (more samples)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating slices per reader")
    ap.add_argument("--gpus", type=int, default=8, help="N GPUs for the loader-core estimate")
    ap.add_argument("--model-rate", type=float, default=3000.0,
                    help="images/s one GPU trains (a stated figure, not measured here; default 3000 for a "
                         "ResNet-18 U-Net at 224 px on an H200, the issue's 'several thousand')")
    ap.add_argument("--epoch", type=int, default=2000, help="N for the memory check: epochs of N and 10*N images")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        work = Path(tmp)
        src = synth_nih(work / "nih", args.images, size=1024, seed=0)
        built = build_all(src, work, args.repeat)
        files = write_png_files(built["png"][0], work / "files")
        originals = sorted((src / "images").glob("*.png"))
        d = decoders(sample_bytes(built["png"][0], ".png"), sample_bytes(built["raw"][0], ".npy"))

        def stream(folder, image_size=None):
            loader = make_loader(f"{folder}/*.tar", mode="eval", batch_size=64, num_workers=0, image_size=image_size,
                                 pin_memory=False)
            return lambda: iter(loader)

        def mapstyle(paths, size=None):
            loader = DataLoader(PNGFiles(paths, size), batch_size=64, num_workers=0)
            return lambda: iter(loader)

        count = lambda b: b["image"].shape[0]
        readers = {
            "(a) PNG shards, 224 px": (stream(built["png"][0]), count),
            "(b) raw shards, 224 px": (stream(built["raw"][0]), count),
            "(c) map-style PNG files, 224 px": (mapstyle(files), lambda b: b.shape[0]),
            "(e) PNG shards at 256 px, PIL resize to 224": (stream(built["png256"][0], SIZE), count),
            "(e) original 1024-px PNG files, PIL resize to 224": (mapstyle(originals, SIZE), lambda b: b.shape[0]),
        }
        first = {name: next(make()) for name, (make, _) in readers.items()}
        for name, b in first.items():
            img = b["image"] if isinstance(b, dict) else b
            assert img.dtype == torch.uint8 and tuple(img.shape[1:]) == (1, SIZE, SIZE), (name, img.shape)
        r = alternate(readers, args.rounds, slice_s=0.5)
        m = bench_rss(built["raw"][0], args.epoch)
        manifests = {k: json.loads((built[k][0] / "manifest.json").read_text())["encoding"] for k in ("png", "raw")}
    load1 = os.getloadavg()

    print()
    print(f"CPU: {cpu.describe()}")
    print(f"load average (1/5/15 min): {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at the start, "
          f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at the end, on {os.cpu_count()} CPUs "
          "(rates are per CPU second of this process: robust to sharing, not immune to cache contention)")
    print(f"{args.images} phantoms x {args.repeat} keys = {args.images * args.repeat} samples per shard folder; "
          f"batches of 64 uint8 [64,1,{SIZE},{SIZE}]")
    print()
    print("| reader | images/s per core | wall images/s | note |")
    print("|---|---|---|---|")
    base = r["(c) map-style PNG files, 224 px"]["cpu_rate"]
    for name, v in r.items():
        note = f"{v['cpu_rate'] / base:.1f}x (c)"
        print(f"| {name} | {v['cpu_rate']:,.0f} | {v['rate']:,.0f} | {note} |")
    for name, v in d.items():
        print(f"| (d) decode alone: {name} | {v['cpu_rate']:,.0f} | {v['rate']:,.0f} | in-memory bytes, "
              f"{SIZE} px |")
    print()
    disk = ", ".join(f"{k}: {v['bytes_per_image'] / 1e3:.1f} kB/image ({v['bytes_per_pixel_byte']:.2f} bytes per "
                     f"pixel byte)" for k, v in manifests.items())
    print(f"disk cost (manifest): {disk}")
    print("build, 1 worker, images per CPU second: " + ", ".join(
        f"{k} {v[1]:.0f}" for k, v in built.items()) + " (1024 px -> stored size)")
    demand = args.gpus * args.model_rate
    print(f"loader cores for {args.gpus} GPUs at {args.model_rate:,.0f} images/s each ({demand:,.0f} images/s, "
          f"a stated rate): " + ", ".join(f"{name.split(',')[0]} {demand / r[name]['cpu_rate']:.1f}"
                                          for name in list(r)[:3]))
    fastest = max(d, key=lambda k: d[k]["cpu_rate"] if "npy" not in k and "resize" not in k else -1)
    n, n10 = args.epoch, 10 * args.epoch
    growth = m[n10]["rss_mb"] / m[n]["rss_mb"]
    print(f"fastest PNG decoder here: {fastest}; PIL resize alone costs "
          f"{1e6 / d['PIL bilinear resize 256 -> 224 alone']['cpu_rate']:.0f} us/image against "
          f"{1e6 / r['(b) raw shards, 224 px']['cpu_rate']:.0f} us/image for the whole raw read")
    print(f"peak RSS streaming raw shards (main + 1 worker): {m[n]['rss_mb']:.0f} MB at {m[n]['seen']} images, "
          f"{m[n10]['rss_mb']:.0f} MB at {m[n10]['seen']}: growth {growth:.2f}x (goal <= 1.2x)")
    ra, rb = r["(a) PNG shards, 224 px"]["cpu_rate"], r["(b) raw shards, 224 px"]["cpu_rate"]
    print(f"raw shards {rb:,.0f} images/s per core (goal >= 5,000), {rb / ra:.1f}x PNG shards, "
          f"{rb / base:.1f}x map-style PNG files; PNG shards {ra / base:.1f}x map-style PNG files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
