"""Compare initialisations (e.g. our SSL encoder vs scratch) on diagnosis over seeds: mean ± sd per metric.

Data and the split are loaded once and shared by every (backbone, seed) run, so the runs differ only in
initialisation and training randomness.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from downstream.backbones import load_backbone
from downstream.data import ImageSet
from downstream.diagnosis import train_diagnosis
from downstream.metrics import fmt_mean_sd, mean_sd

COMPARE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")


def compare_initialisations(config: dict, backbones: Sequence[str], seeds: Sequence[int], *, data: ImageSet,
                            splits: dict, names: Sequence[str] | None = None,
                            on_run: Callable[[str, int, dict], None] | None = None,
                            on_result: Callable[[str, int, dict], None] | None = None) -> dict:
    """Train diagnosis once per (backbone spec, seed); returns per-run test metrics and their mean ± sd.

    `on_run(name, seed, row)` gets each run's metric row; `on_result(name, seed, result)` the whole
    `train_diagnosis` result (trained model included) before it is dropped, e.g. to plot the first seed.
    """
    names = list(names or backbones)
    runs, summary = [], {}
    for name, spec in zip(names, backbones):
        per_seed = []
        for seed in seeds:
            torch.manual_seed(int(seed))
            bb = load_backbone(spec, image_size=config.get("image_size"))
            res = train_diagnosis({**config, "backbone": spec, "seed": int(seed)}, data=data, splits=splits,
                                  backbone=bb)
            row = {"init": name, "backbone": spec, "seed": int(seed), "best_epoch": res["best_epoch"],
                   **{k: res["test"][k] for k in COMPARE_METRICS},
                   **{f"val_{k}": res["val"][k] for k in COMPARE_METRICS}}
            per_seed.append(row)
            runs.append(row)
            if on_run is not None:
                on_run(name, int(seed), row)
            if on_result is not None:
                on_result(name, int(seed), res)
            del res
        summary[name] = {k: mean_sd([r[k] for r in per_seed]) for k in COMPARE_METRICS}
    return {"seeds": [int(s) for s in seeds], "runs": runs, "summary": summary}


def table(result: dict) -> str:
    lines = ["| initialisation | " + " | ".join(COMPARE_METRICS) + " |",
             "|---|" + "---|" * len(COMPARE_METRICS)]
    for name, m in result["summary"].items():
        lines.append(f"| {name} | " + " | ".join(fmt_mean_sd(m[k]) for k in COMPARE_METRICS) + " |")
    return "\n".join(lines)


def file_label(name: str) -> str:
    """An initialisation's name as a file-name part ('ssl (genesis)' -> 'ssl_genesis')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "init"


def write_run_figures(name: str, result: dict, data: ImageSet, out_dir: str | Path, *, per_class: int = 2,
                      max_channels: int | None = 256) -> dict:
    """OUT/confusion_<name>.png and OUT/scorecam/<name>/<class>_<key>.png for one (seed's) run."""
    from downstream import plots
    from downstream.data import DIAGNOSIS_CLASSES
    from downstream.diagnosis import scorecam_overlays

    out, label = Path(out_dir), file_label(name)
    confusion = plots.confusion_png(result["test"]["confusion"], DIAGNOSIS_CLASSES, out / f"confusion_{label}.png",
                                    title=f"{name}, seed {result['config']['seed']} (test)")
    cams = scorecam_overlays(result, data, out / "scorecam" / label, per_class, max_channels)
    return {"confusion": str(confusion), "scorecam": cams}
