"""Severity sweep time: backbone features computed once in the driver and shared through the Ray object store,
versus recomputed in every trial. Same data, same space, same seed (so the same trials), same Ray, one run.

    python benchmarks/bench_tune_features.py [--trials 6] [--n-covid 100] [--size 128] [--backbone scratch:densenet121]

Prints a table, then the headline ratio (recompute / shared) as the last line.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPACE = """features: pooled
regressor: {choice: [linear, ridge, mlp]}
alpha: {loguniform: [1.0e-2, 1.0e+2]}
hidden: 16
max_iter: 200
flip: {choice: [none, h, v, hv]}
folds: 5
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--n-covid", type=int, default=100, help="phantom images (about 80%% carry severity scores)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--backbone", default="scratch:densenet121")
    p.add_argument("--num-cpus", type=int, default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")

    from downstream.tuning import SweepSettings, init_ray, run_sweep
    from shards.__main__ import main as shards_main

    with tempfile.TemporaryDirectory(prefix="bench_tune_") as tmp:
        root = Path(tmp)
        shards_main(["synth", "--out", str(root / "raw"), "--n-nih", "0", "--n-covid", str(a.n_covid),
                     "--size", str(a.size)])
        shards_main(["build", "covid-chestxray", "--src", str(root / "raw" / "covid-chestxray"),
                     "--out", str(root / "shards"), "--size", str(a.size)])
        (root / "space.yaml").write_text(SPACE)
        init_ray(num_cpus=a.num_cpus, verbose=0)
        # Warm-up (not timed): the first sweep in a fresh Ray also pays for worker start-up and cold imports.
        run_sweep(SweepSettings(task="severity", shards=[str(root / "shards")], backbone=a.backbone,
                                space=str(root / "space.yaml"), out=str(root / "warmup"), num_samples=1,
                                scheduler="fifo", image_size=a.size, wandb_mode="disabled"), verbose=0, evaluate=False)
        times, bests = {}, {}
        for label, share in (("shared (driver, object store)", True), ("recomputed in every trial", False)):
            s = SweepSettings(task="severity", shards=[str(root / "shards")], backbone=a.backbone,
                              space=str(root / "space.yaml"), out=str(root / ("shared" if share else "recompute")),
                              num_samples=a.trials, scheduler="fifo", image_size=a.size, share_features=share,
                              wandb_mode="disabled", seed=0)
            t0 = time.perf_counter()
            res = run_sweep(s, verbose=0, evaluate=False)
            times[label] = time.perf_counter() - t0
            bests[label] = (res["best"]["trial_id"].split("_")[-1], res["best"]["validation"]["val_mse"])
    print(f"\nseverity sweep, {a.trials} trials, {a.backbone} at {a.size}px, {a.n_covid} phantoms, "
          f"{os.cpu_count()} CPUs")
    print("| features | sweep seconds | seconds/trial | best trial | best val MSE |\n|---|---|---|---|---|")
    for label, t in times.items():
        print(f"| {label} | {t:.1f} | {t / a.trials:.2f} | {bests[label][0]} | {bests[label][1]:.4f} |")
    shared, recompute = times.values()
    print(f"recomputing features in every trial is {recompute / shared:.2f}x slower than sharing them "
          f"({recompute:.1f} s vs {shared:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
