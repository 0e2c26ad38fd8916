"""Phantom generation rate on one core: render + PNG encode, and the full synth writer, at 128/256/512 px.

Pins BLAS to one thread before numpy loads. Reports the best of several rounds, so that other
processes on a shared machine inflate it less. Usage: python benchmarks/bench_synth.py [--n 120]
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from shards import phantom, synth

GOAL = 200.0


def _cases(n: int):
    """A covid-set mix: a third each of bilateral GGO, lobar consolidation and clear lungs."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        cls = synth.COVID_CLASSES[i % 3]
        out.append((phantom.sample_anatomy(rng), synth._covid_lesions(rng, cls, int(rng.integers(1, 5)))))
    return out


def rate_render(size: int, n: int, png_level: int, rounds: int = 3) -> tuple[float, float]:
    """(images/s rendering only, images/s rendering + PNG encoding)."""
    cases = _cases(n)
    best_r = best_e = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        imgs = [phantom.render(size, a, les, "PA", np.random.default_rng(i)).image
                for i, (a, les) in enumerate(cases)]
        t1 = time.perf_counter()
        for im in imgs:
            synth.encode_png(im, png_level)
        t2 = time.perf_counter()
        best_r = max(best_r, n / (t1 - t0))
        best_e = max(best_e, n / ((t1 - t0) + (t2 - t1)))
    return best_r, best_e


def rate_writer(size: int, n: int, rounds: int = 2) -> float:
    """images/s of synth_covid end to end: render, PNG/JPEG, masks .npz, truth JSON, CSVs."""
    best = 0.0
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            synth.synth_covid(Path(tmp) / "covid-chestxray", n, size=size, seed=0)
            best = max(best, n / (time.perf_counter() - t0))
    return best


def contact_sheet(path: Path, per_class: int = 5, size: int = 192) -> None:
    """A labelled grid of phantoms per class (docs/phantoms.png), with lesion outlines on the last row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("COVID-19", "covid"), ("pneumonia", "pneumonia"), ("normal", "normal")]
    nih = [["Effusion"], ["Cardiomegaly"], ["Mass"], ["Pneumothorax"], ["Nodule", "Infiltration"]]
    fig, axes = plt.subplots(4, per_class, figsize=(per_class * 1.6, 4 * 1.75), dpi=90)
    for r, (title, cls) in enumerate(rows):
        for c in range(per_class):
            rng = np.random.default_rng([11, r, c])
            les = synth._covid_lesions(rng, cls, 1 + c % 4)
            view = "PA" if c % 2 == 0 else "AP"
            ph = phantom.render(size, phantom.sample_anatomy(rng), les, view, rng)
            sev = synth._severity(ph)
            ax = axes[r, c]
            ax.imshow(ph.image, cmap="gray", vmin=0, vmax=255)
            if ph.masks["lesion"].any():
                ax.contour(ph.masks["lesion"], levels=[0.5], colors="r", linewidths=0.4)
            ax.set_title(f"{title} {view}\ngeo {sev['geographic_mean']:.0f} opa {sev['opacity_mean']:.0f}",
                         fontsize=6)
    for c, findings in enumerate(nih[:per_class]):
        rng = np.random.default_rng([12, c])
        les, cardio = synth._nih_lesions(rng, findings)
        ph = phantom.render(size, phantom.sample_anatomy(rng), les, "PA", rng, cardiomegaly=cardio)
        axes[3, c].imshow(ph.image, cmap="gray", vmin=0, vmax=255)
        axes[3, c].set_title("NIH: " + "|".join(findings), fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("shards.synth phantoms (red: rendered lesion mask)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"contact sheet written to {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=120, help="images per measurement (default 120)")
    ap.add_argument("--sheet", type=Path, help="also write a contact sheet PNG here (docs/phantoms.png)")
    args = ap.parse_args()
    if args.sheet:
        contact_sheet(args.sheet)
    print(f"phantom generation, one core (OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}), "
          f"best of rounds, n={args.n}")
    print(f"{'size':>5} | {'render img/s':>12} | {'+PNG lvl 1':>10} | {'+PNG lvl 0':>10} | {'synth_covid img/s':>17}")
    results = {}
    for size in (128, 256, 512):
        n = args.n if size < 512 else max(12, args.n // 3)
        r, e1 = rate_render(size, n, 1)
        _, e0 = rate_render(size, n, 0, rounds=1)
        w = rate_writer(size, n)
        results[size] = e1
        print(f"{size:>5} | {r:>12.0f} | {e1:>10.0f} | {e0:>10.0f} | {w:>17.0f}")
    r256 = results[256]
    print(f"256 px render + PNG(level 1): {r256:.0f} images/s = {r256 / GOAL:.2f}x the {GOAL:.0f}/s goal "
          f"({'met' if r256 >= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
