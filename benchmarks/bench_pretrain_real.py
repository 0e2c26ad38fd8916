"""Models Genesis pretraining on the real chest X-rays in ../shared/data, judged against the random init.

    python benchmarks/bench_pretrain_real.py [--max-steps 150] [--lrs 0.02 0.1] [--encoder resnet18]
                                             [--image-size 64] [--minutes 60] [--out runs/bench_pretrain_real]

1. Builds shards of the three public sets once (`python -m shards build`, into runs/bench_real_shards).
2. For each candidate lr, runs `launch/pretrain.py` on their train splits for --max-steps (a step budget, so
   that the result does not depend on the machine's load; --minutes is only a safety cap), validating
   restoration on the val splits (beside the identity, blur and mean-image baselines) and probing the frozen
   encoder online on the train split's diagnosis labels (patient-grouped CV; step 0 is the random init).
3. Selection on val: each run's final encoder and the random init get the same probes, fitted on the train
   split and scored on the val split; the lr with the higher val macro-AUROC gain over random init wins.
4. Test, once: the chosen encoder and the random init, probes fitted on train + val, scored on test.
Prints every table; the probe curve and the reconstruction grid go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runkit.tracking import read_jsonl

SOURCES = {"covid-chestxray": "covid-chestxray-dataset", "actualmed": "actualmed-covid-chestxray",
           "figure1": "figure1-covid-chestxray"}
KEYS = ("multiscale/diagnosis_auroc", "multiscale/diagnosis_bacc", "multiscale/diagnosis_knn_bacc",
        "pooled/diagnosis_auroc", "pooled/diagnosis_bacc")


def build_shards(data: Path, out: Path, size: int) -> None:
    for fmt, folder in SOURCES.items():
        if (out / fmt / "manifest.json").exists():
            continue
        cmd = [sys.executable, "-m", "shards", "build", fmt, "--src", str(data / folder), "--out", str(out / fmt),
               "--size", str(size), "--max-count", "64", "--no-progress"]
        subprocess.run(cmd, cwd=REPO, check=True)


def pretrain(a, shards: Path, out: Path, lr: float) -> float:
    cmd = [sys.executable, "launch/pretrain.py", "--train-shards", f"{shards}/*/train-*.tar",
           "--val-shards", f"{shards}/*/val-*.tar", "--probe-shards", f"{shards}/*/train-*.tar",
           "--probe-every", str(a.probe_every), "--out", str(out),
           "--deepspeed_config", "launch/configs/ds_cpu.json", "--encoder", a.encoder,
           "--image-size", str(a.image_size), "--batch-size", str(a.batch_size), "--max-steps", str(a.max_steps),
           "--max-minutes", str(a.minutes), "--epoch-size", "512", "--lr", str(lr), "--warmup-steps", "10",
           "--val-every", str(a.probe_every), "--checkpoint-every", str(a.probe_every), "--keep-last", "1",
           "--log-every", "10", "--num-workers", "1", "--shuffle-buffer", "200",
           "--wandb-mode", os.environ.get("WANDB_MODE", "offline")]
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, DS_ACCELERATOR="cpu", TQDM_DISABLE="1"))
    return time.perf_counter() - t


def heldout_scores(encoder, data, train_splits: tuple[str, ...], test_split: str) -> dict:
    import numpy as np
    import torch

    from pretrain.probes import encoder_features, fit_probes

    use = np.isin(data.splits, (*train_splits, test_split))
    sub = type(data)(data.images[torch.as_tensor(np.flatnonzero(use))], data.targets[use], data.groups[use],
                     data.splits[use])
    feats = encoder_features(encoder, sub.images, device=torch.device("cpu"))
    return fit_probes(feats, sub, holdout=sub.splits == test_split)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--shards", default=str(REPO / "runs" / "bench_real_shards"))
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_pretrain_real"))
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock cap of each pretraining run")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.1], help="candidate base lrs (chosen on val)")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=150, help="optimizer steps per run (the lr schedule's length)")
    ap.add_argument("--probe-every", type=int, default=50)
    ap.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming its runs")
    a = ap.parse_args(argv)
    data_dir, shards, out = Path(a.data), Path(a.shards), Path(a.out)
    if not data_dir.is_dir():
        print(f"bench_pretrain_real: no real data at {data_dir}", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    from launch.report import loss_curve, probe_curve
    from pretrain.model import build_unet, load_encoder
    from pretrain.probes import gain, load_probe_set

    build_shards(data_dir, shards / str(a.image_size), a.image_size)
    shards = shards / str(a.image_size)
    if a.fresh and out.exists():
        shutil.rmtree(out)
    data = load_probe_set(f"{shards}/*/*.tar", image_size=a.image_size)
    counts = {s: int(((data.splits == s) & (data.diagnosis >= 0)).sum()) for s in ("train", "val", "test")}
    print(f"labelled images: {data.describe()}; per split {counts}", flush=True)
    torch.manual_seed(0)  # the trainer's --seed 0 init
    random_encoder = build_unet(a.encoder).encoder
    random_val = heldout_scores(random_encoder, data, ("train",), "val")

    runs = {}
    for lr in a.lrs:
        run = out / f"lr_{lr:g}"
        wall = pretrain(a, shards, run, lr)
        rows = read_jsonl(run / "metrics.jsonl")
        encoder, _ = load_encoder(run / "last")
        runs[lr] = {"run": run, "rows": rows, "wall": wall, "encoder": encoder,
                    "val": heldout_scores(encoder, data, ("train",), "val")}
        loss_curve(rows, run / "loss.png")
        probe_curve(rows, run / "probes.png")

    print(f"\n{a.encoder} U-Net + CBAM at {a.image_size} px, batch {a.batch_size}, {a.max_steps} steps per run; "
          + ", ".join(f"lr {lr:g}: {r['wall'] / 60:.1f} min" for lr, r in runs.items()))
    print("\n| lr | steps | images | val SSIM restored | identity | blur | mean image | margin | spread ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lr, r in runs.items():
        v = [x for x in r["rows"] if "val/ssim" in x][-1]
        t = [x for x in r["rows"] if "loss" in x][-1]
        print(f"| {lr:g} | {t['step']} | {t['samples_seen']} | {v['val/ssim']:.4f} | {v['val/ssim_identity']:.4f} | "
              f"{v['val/ssim_blur']:.4f} | {v['val/ssim_mean_image']:.4f} | {v['val/ssim_margin']:+.4f} | "
              f"{v['val/spread_ratio']:.3f} |")
    print("\nonline probe (CV on the train split), first and last against the step-0 random init:")
    print("\n| lr | step | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for lr, r in runs.items():
        probes = [x for x in r["rows"] if f"probe/{KEYS[0]}" in x]
        for x in (probes[0], probes[-1]):
            print(f"| {lr:g} | {x['step']} | " + " | ".join(f"{x[f'probe/{k}']:.3f}" for k in KEYS) + " |")
    print("\nselection: probes fitted on train, scored on val (random init: "
          + ", ".join(f"{k} {random_val[f'probe/{k}']:.3f}" for k in KEYS[:2]) + ")")
    print("\n| lr | " + " | ".join(KEYS) + " | gain in " + KEYS[0] + " |")
    print("|---|" + "---|" * (len(KEYS) + 1))
    for lr, r in runs.items():
        g = gain("auroc", r["val"][f"probe/{KEYS[0]}"], random_val[f"probe/{KEYS[0]}"])
        r["val_gain"] = g
        print(f"| {lr:g} | " + " | ".join(f"{r['val'][f'probe/{k}']:.3f}" for k in KEYS) + f" | {g:+.3f} |")
    best = max(runs, key=lambda lr: runs[lr]["val_gain"])
    test = {"pretrained": heldout_scores(runs[best]["encoder"], data, ("train", "val"), "test"),
            "random init": heldout_scores(random_encoder, data, ("train", "val"), "test")}
    print(f"\ntest, once (lr {best:g} chosen on val; probes fitted on train + val, scored on the "
          f"{counts['test']} test images):")
    print("\n| encoder | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for name, m in test.items():
        print(f"| {name} | " + " | ".join(f"{m[f'probe/{k}']:.3f}" for k in KEYS) + " |")
    diffs = {k: test["pretrained"][f"probe/{k}"] - test["random init"][f"probe/{k}"] for k in KEYS}
    print("\ntest gain of the pretrained encoder over random init: "
          + ", ".join(f"{k} {d:+.3f}" for k, d in diffs.items()))
    r = runs[best]
    probe_s = [x["probe/seconds"] for x in r["rows"] if "probe/seconds" in x and x["step"] > 0]
    steps = [x["step"] for x in r["rows"] if "loss" in x][-1]
    train_s = r["wall"] - sum(x["probe/seconds"] for x in r["rows"] if "probe/seconds" in x)
    per_step = train_s / max(steps, 1)
    if probe_s:
        print(f"\nprobe cost: {np.mean(probe_s):.1f} s per probe of {len(data)} images; at the default "
              f"--probe-every 500 and this run's {per_step:.2f} s per step (startup included) that is "
              f"{100 * np.mean(probe_s) / (500 * per_step):.1f} % of the training time")
    grids = sorted((runs[best]["run"] / "samples").glob("*.png"))
    print(f"reconstruction grid: {grids[-1] if grids else 'none'}; probe curve: {runs[best]['run'] / 'probes.png'}")
    (out / "summary.json").write_text(json.dumps({"chosen_lr": best, "test": test, "test_gain": diffs,
                                                  "val": {str(lr): r["val"] for lr, r in runs.items()},
                                                  "random_val": random_val}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
