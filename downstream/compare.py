"""Compare initialisations (e.g. our SSL encoder vs scratch) on diagnosis over seeds: mean ± sd per metric.

Data and the split are loaded once and shared by every (backbone, seed) run, so the runs differ only in
initialisation and training randomness.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from downstream.backbones import load_backbone
from downstream.data import ImageSet
from downstream.diagnosis import train_diagnosis
from downstream.metrics import fmt_mean_sd, mean_sd

COMPARE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")


def compare_initialisations(config: dict, backbones: Sequence[str], seeds: Sequence[int], *, data: ImageSet,
                            splits: dict, names: Sequence[str] | None = None,
                            on_run: Callable[[str, int, dict], None] | None = None) -> dict:
    """Train diagnosis once per (backbone spec, seed); returns per-run test metrics and their mean ± sd."""
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
        summary[name] = {k: mean_sd([r[k] for r in per_seed]) for k in COMPARE_METRICS}
    return {"seeds": [int(s) for s in seeds], "runs": runs, "summary": summary}


def table(result: dict) -> str:
    lines = ["| initialisation | " + " | ".join(COMPARE_METRICS) + " |",
             "|---|" + "---|" * len(COMPARE_METRICS)]
    for name, m in result["summary"].items():
        lines.append(f"| {name} | " + " | ".join(fmt_mean_sd(m[k]) for k in COMPARE_METRICS) + " |")
    return "\n".join(lines)
