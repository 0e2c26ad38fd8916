"""Peak memory of NIH-14 training from streamed shards, at N and 10 x N phantom images.

    python benchmarks/bench_nih14_stream.py [--n 200] [--size 64] [--steps 20] [--batch-size 16] [--out DIR]
                                            [--encoding png|raw]

Builds NIH-format phantom shards of N and 10N images, then trains the NIH-14 head (`downstream.nih14`,
`stream: on`: index the JSON, split by patient, stream the training split; validation and test stream
too) for the same number of steps in a fresh process per size, and reads that process's peak RSS.
The in-memory alternative (one uint8 ImageSet) would hold N x size² bytes more at each size; the
table shows that figure beside the measurement. Goal: peak RSS at 10N at most 1.2x the one at N.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(root: Path, n: int, size: int, encoding: str = "png") -> Path:
    from shards.sources import get_source
    from shards.synth import synth_nih
    from shards.writer import build as build_shards

    raw = synth_nih(root / f"raw-{n}" / "nih", n, size=size, seed=0)
    out = root / f"shards-{n}-{encoding}"
    build_shards(get_source("nih").scan(raw), out, source="nih", size=size, workers=1, progress=False, max_count=100,
                 encoding=encoding)
    return out


def child(shards: str, size: int, steps: int, batch_size: int, stream: str = "on") -> None:
    """One training run in a fresh process; prints a JSON line with this process's peak RSS (Linux: KiB)."""
    import torch

    from downstream.nih14 import train_nih14

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    t0 = time.time()
    res = train_nih14({"shards": [shards], "backbone": "scratch:resnet18", "image_size": size, "epochs": 1,
                       "steps_per_epoch": steps, "batch_size": batch_size, "eval_batch_size": 64,
                       "bn_recalibrate": 2, "device": "cpu", "progress": False, "resplit": True,
                       "stream": stream})
    print(json.dumps({"streamed": res["streamed"], "counts": res["counts"], "seconds": time.time() - t0,
                      "mean_auroc": res["test"]["mean_auroc"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(shards: Path, size: int, steps: int, batch_size: int, stream: str = "on") -> dict:
    cmd = [sys.executable, __file__, "--child", str(shards), "--size", str(size), "--steps", str(steps),
           "--batch-size", str(batch_size), "--stream", stream]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "WANDB_MODE": "disabled"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="N (the second size is 10 N)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="keep the phantom shards here (default: a temp folder)")
    p.add_argument("--encoding", choices=("png", "raw"), default="png", help="shard encoding (build --encoding)")
    p.add_argument("--in-memory", action="store_true", help="also measure the in-memory path (stream: off)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--stream", default="on", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.size, a.steps, a.batch_size, a.stream)
        return 0
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench_nih14_"))
    rows, memory = [], []
    for n in (a.n, 10 * a.n):
        shards = build(root, n, a.size, a.encoding)
        rows.append((n, measure(shards, a.size, a.steps, a.batch_size)))
        if a.in_memory:
            memory.append((n, measure(shards, a.size, a.steps, a.batch_size, stream="off")))
    print("| images | streamed | train/val/test | peak RSS (MB) | uint8 images of the set (MB) | seconds |")
    print("|---|---|---|---|---|---|")
    for n, info in rows + memory:
        c = info["counts"]
        print(f"| {n} | {info['streamed']} | {c['train']}/{c['val']}/{c['test']} | {info['peak_rss_mb']:.0f} | "
              f"{n * a.size * a.size / 2**20:.1f} | {info['seconds']:.1f} |")
    if memory:
        print(f"in memory (stream: off): {memory[1][1]['peak_rss_mb'] / memory[0][1]['peak_rss_mb']:.2f}x")
    ratio = rows[1][1]["peak_rss_mb"] / rows[0][1]["peak_rss_mb"]
    print(f"peak RSS at {10 * a.n} images / at {a.n} images: {ratio:.2f}x (goal <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
