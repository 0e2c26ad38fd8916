"""Diagnosis on the real X-rays in ../shared/data: SSL (Models Genesis) initialisation vs scratch, 3 seeds.

    python benchmarks/bench_downstream_real.py [--run RUN] [--size 96] [--epochs 5] [--encoder resnet18]

COVID-19 / pneumonia / normal from covid-chestxray, Actualmed and Figure1 (no NIH here, so normal is
rare: ~40 normal vs ~450 COVID). Balanced accuracy and macro-F1 are the numbers to read, not accuracy.
With no --run, a short pretraining on the same images (train split only) runs first; it is short, so
read the comparison as a pipeline check, not as the paper's claim.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCES = {"covid-chestxray": "covid-chestxray-dataset", "actualmed": "actualmed-covid-chestxray",
           "figure1": "figure1-covid-chestxray"}


def build_shards(data: Path, work: Path, size: int) -> list[str]:
    out = []
    for source, folder in SOURCES.items():
        if not (data / folder).is_dir():
            continue
        dest = work / "shards" / source
        subprocess.run([sys.executable, "-m", "shards", "build", source, "--src", str(data / folder),
                        "--out", str(dest), "--size", str(size)], cwd=REPO, check=True, capture_output=True)
        out.append(str(dest))
    return out


def pretrain(shards: list[str], work: Path, encoder: str, size: int, steps: int) -> Path:
    run = work / "ssl"
    train = " ".join(f"{s}/train-*.tar" for s in shards)
    val = " ".join(f"{s}/val-*.tar" for s in shards)
    cmd = [sys.executable, "launch/pretrain.py", "--train-shards", train, "--val-shards", val, "--out", str(run),
           "--encoder", encoder, "--image-size", str(size), "--batch-size", "16", "--max-steps", str(steps),
           "--epoch-size", "320", "--val-every", str(steps), "--checkpoint-every", str(steps),
           "--lr", "0.05", "--warmup-steps", "15",  # the demo's rate: 0.05 * 16/256 = 3e-3 peak for Adam
           "--num-workers", "1", "--wandb-mode", "disabled"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (run / "encoder.pt").is_file():
        raise SystemExit(f"pretraining failed:\n{done.stderr[-3000:]}")
    return run / "encoder.pt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--run", help="a pretrained run folder or encoder.pt (default: pretrain briefly here)")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    from downstream.compare import compare_initialisations, table
    from downstream.data import DIAGNOSIS_CLASSES, split_indices
    from downstream.diagnosis import load_diagnosis_data

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = build_shards(Path(args.data), work, args.size)
        data = load_diagnosis_data(shards, args.size)
        # The shards' own patient-grouped splits: pretraining reads train-*.tar only, so no val or test
        # image is seen, even unlabelled, before it is evaluated.
        splits = split_indices(data, seed=0)
        counts = {s: dict(zip(DIAGNOSIS_CLASSES, [int((data.targets[i] == c).sum()) for c in range(3)]))
                  for s, i in splits.items()}
        print(f"images per split and class: {counts}")
        t1 = time.time()
        ssl = Path(args.run) if args.run else pretrain(shards, work, args.encoder, args.size, args.pretrain_steps)
        t2 = time.time()
        cfg = {"image_size": args.size, "epochs": args.epochs, "batch_size": 16, "lr": 3e-3, "backbone_lr": 1e-3,
               "affine": False, "balance": "sampler", "progress": False, "scorecam_per_class": 0}
        result = compare_initialisations(
            cfg, [str(ssl), f"scratch:{args.encoder}"], args.seeds, data=data, splits=splits,
            names=["ssl (genesis)", "scratch"],
            on_run=lambda n, s, r: print(f"  {n} seed {s}: balanced acc {r['balanced_accuracy']:.3f}, "
                                         f"macro-F1 {r['macro_f1']:.3f}", flush=True))
        t3 = time.time()
    print(f"\nshards {t1 - t0:.0f} s, pretraining {t2 - t1:.0f} s, fine-tuning {t3 - t2:.0f} s "
          f"({len(args.seeds)} seeds x 2 initialisations, {args.epochs} epochs, {args.size} px, test n="
          f"{len(splits['test'])})\n")
    print(table(result))
    s, b = result["summary"]["ssl (genesis)"], result["summary"]["scratch"]
    print(f"headline: macro-F1 SSL / scratch = {s['macro_f1']['mean'] / max(b['macro_f1']['mean'], 1e-9):.2f}x "
          f"({s['macro_f1']['mean']:.3f} vs {b['macro_f1']['mean']:.3f}; balanced accuracy "
          f"{s['balanced_accuracy']['mean']:.3f} vs {b['balanced_accuracy']['mean']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
