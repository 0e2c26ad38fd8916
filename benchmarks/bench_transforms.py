"""Batched Models Genesis transforms vs the per-sample numpy port of the reference, on CPU, side by side.

    python benchmarks/bench_transforms.py [--sizes 128 224] [--batch 64] [--reps 5] [--chunk-sweep]

Both run single-threaded by default (the numpy port is; the machine is shared), with the reference's
probabilities, timed in CPU seconds of this process (robust to other users of a shared machine; wall
clock would charge their time to whichever side was running). Rows: images/s per implementation and
size, with the CPU chunk the transforms chose from this machine's cache (runkit.cpu) and the minor page faults
per batched image (non-zero in steady state: the heap returns memory to the OS). The final line is
the smallest speed-up over sizes, beside the CPU model and its caches. `--chunk-sweep` also times the
batched version at chunk sizes from 8 Ki to 2 Mi pixels (what CHUNK_BYTES_PER_PIXEL is set from).
The process keeps freed memory in its heap, as the pretraining entry point does (`runkit.allocator`);
`--glibc-default` measures with glibc's default thresholds instead.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import genesis_reference as ref

from pretrain.transforms import GenesisConfig, cpu_chunk_pixels, genesis_batch
from runkit import cpu
from runkit.allocator import keep_freed_memory


def _time(fn, reps: int, faults: list | None = None) -> float:
    """Median CPU seconds of `reps` calls after one warm-up; appends minor page faults per call to `faults`."""
    fn()
    times = []
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    if faults is not None:
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / reps)
    return statistics.median(times)


def _measure(size: int, args) -> tuple[int, float, float, float]:
    cfg = GenesisConfig()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, size, size, generator=g)
    xn = x.double().numpy()
    seeds = iter(range(10_000))
    t_ref = _time(lambda: ref.genesis_batch_numpy(xn, cfg, seed=next(seeds)), args.ref_reps)
    faults: list = []
    t_bat = _time(lambda: genesis_batch(x, cfg, g), args.reps, faults)
    return size, args.batch / t_ref, args.batch / t_bat, t_ref / t_bat, faults[0] / args.batch


def _sweep(size: int, args) -> list[tuple[int, float]]:
    """(chunk samples, batched images/s) for chunks of 2^13..2^21 pixels."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, size, size, generator=g)
    chunks = sorted({max(1, min(args.batch, (1 << p) // (size * size))) for p in range(13, 22)})
    return [(c, args.batch / _time(lambda c=c: genesis_batch(x, GenesisConfig(), g, chunk=c), args.reps))
            for c in chunks]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5, help="timed calls of the batched version per size")
    ap.add_argument("--ref-reps", type=int, default=1, help="timed batches of the numpy port per size")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the batched version")
    ap.add_argument("--chunk-sweep", action="store_true", help="also time the batched version at other chunk sizes")
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's malloc thresholds as they are (the trainer raises them)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    heap = "glibc default" if args.glibc_default else f"freed memory kept: {keep_freed_memory()}"
    rows = [_measure(size, args) for size in tqdm(args.sizes, desc="sizes")]

    sweeps = {size: _sweep(size, args) for size in args.sizes} if args.chunk_sweep else {}
    px = cpu_chunk_pixels()

    print(f"\nModels Genesis transforms, CPU, batch {args.batch}, torch threads {args.threads}, malloc: {heap}, "
          f"torch CPU kernels: {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'size':>6} | {'numpy reference img/s':>22} | {'batched img/s':>14} | {'speed-up':>8} | chunk (samples) | "
          "page faults per image (batched)")
    print("-" * 112)
    for size, r, b, s, f in rows:
        print(f"{size:>6} | {r:>22.1f} | {b:>14.1f} | {s:>7.1f}x | {max(1, px // (size * size)):>15} | {f:.1f}")
    for size, sweep in sweeps.items():
        print(f"chunk sweep at {size} px (samples: img/s): " + ", ".join(f"{c}: {r:.0f}" for c, r in sweep))
    worst = float(np.min([r[3] for r in rows]))
    print(f"batched vs numpy reference: {worst:.1f}x (goal >= 20x) on {cpu.describe()}; "
          f"CPU chunk {px:,} pixels")


if __name__ == "__main__":
    main()
