"""Models Genesis pretraining on the real chest X-rays in ../shared/data within a CPU time budget.

    python benchmarks/bench_pretrain_real.py [--minutes 6] [--encoder resnet18] [--out runs/bench_pretrain_real]

Builds 128 px shards of the three public sets once (`python -m shards build`, into runs/bench_real_shards),
then runs `launch/pretrain.py` on their train splits for at most --minutes, validating on their val splits.
Reports validation restoration SSIM/PSNR against the identity baseline (the corrupted input itself, same
fixed-seed corruption), and where the reconstruction grid (original | corrupted | restored) went.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runkit.tracking import read_jsonl

SOURCES = {"covid-chestxray": "covid-chestxray-dataset", "actualmed": "actualmed-covid-chestxray",
           "figure1": "figure1-covid-chestxray"}


def build_shards(data: Path, out: Path, size: int) -> None:
    for fmt, folder in SOURCES.items():
        if (out / fmt / "manifest.json").exists():
            continue
        cmd = [sys.executable, "-m", "shards", "build", fmt, "--src", str(data / folder), "--out", str(out / fmt),
               "--size", str(size), "--max-count", "64", "--no-progress"]
        subprocess.run(cmd, cwd=REPO, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--shards", default=str(REPO / "runs" / "bench_real_shards"))
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_pretrain_real"))
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=150, help="lr schedule length; the budget may stop earlier")
    ap.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming it")
    a = ap.parse_args(argv)
    data, shards, out = Path(a.data), Path(a.shards), Path(a.out)
    if not data.is_dir():
        print(f"bench_pretrain_real: no real data at {data}", file=sys.stderr)
        return 2
    build_shards(data, shards, a.image_size)
    if a.fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "launch/pretrain.py", "--train-shards", f"{shards}/*/train-*.tar",
           "--val-shards", f"{shards}/*/val-*.tar", "--out", str(out),
           "--deepspeed_config", "launch/configs/ds_cpu.json", "--encoder", a.encoder,
           "--image-size", str(a.image_size), "--batch-size", str(a.batch_size), "--max-steps", str(a.max_steps),
           "--max-minutes", str(a.minutes), "--epoch-size", "512", "--lr", "0.02", "--warmup-steps", "10",
           "--val-every", "50", "--checkpoint-every", "50", "--keep-last", "1", "--log-every", "10",
           "--num-workers", "1", "--shuffle-buffer", "200", "--wandb-mode", os.environ.get("WANDB_MODE", "offline")]
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    env = dict(os.environ, DS_ACCELERATOR="cpu", TQDM_DISABLE="1")
    subprocess.run(cmd, cwd=REPO, check=True, env=env)
    wall = time.perf_counter() - t

    rows = read_jsonl(out / "metrics.jsonl")
    vals = [r for r in rows if "val/ssim" in r]
    train = [r for r in rows if "loss" in r]
    if not vals:
        print("bench_pretrain_real: no validation was logged", file=sys.stderr)
        return 1
    print(f"\n{a.encoder} at {a.image_size} px, batch {a.batch_size}, {train[-1]['step']} steps "
          f"({train[-1]['samples_seen']} images) in {wall / 60:.1f} min wall, "
          f"last {train[-1]['images_per_s']:.1f} img/s")
    print("\n| step | train loss | val SSIM restored | val SSIM identity | val PSNR restored | val PSNR identity | n |")
    print("|---|---|---|---|---|---|---|")
    loss_at = {r["step"]: r["loss"] for r in train}
    for v in vals:
        print(f"| {v['step']} | {loss_at.get(v['step'], float('nan')):.4f} | {v['val/ssim']:.4f} | "
              f"{v['val/ssim_identity']:.4f} | {v['val/psnr']:.2f} | {v['val/psnr_identity']:.2f} | {v['val/count']} |")
    grids = sorted((out / "samples").glob("*.png"))
    print(f"\nreconstruction grid: {grids[-1] if grids else 'none'}")
    best = max(v["val/ssim"] for v in vals)
    ident = vals[-1]["val/ssim_identity"]
    print(f"validation restoration SSIM {best:.4f} vs identity baseline {ident:.4f} "
          f"({best - ident:+.4f}, x{best / ident:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
