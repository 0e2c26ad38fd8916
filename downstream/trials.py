"""What runs inside one Ray Tune trial: the trainables and the per-trial fitting (downstream.sweep drives them).

Diagnosis trials train on `train` and report validation macro-F1 once per epoch (ASHA stops on epochs);
severity trials run a patient-grouped K-fold CV on train+val and report the running mean validation MSE
once per fold (ASHA stops on folds). Neither sees the test split. A trial runs on CUDA when Ray gave it a
GPU (`--gpus-per-trial`), else on the CPU.

Every trial is a W&B run (runkit Tracker: key-free, offline by default) in a group named after the sweep,
with its own metrics.jsonl under OUT/trials/<trial_id>/.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from downstream.backbones import Backbone, load_backbone
from downstream.config import FAULT_KEY, FLIP_SETS, SeverityConfig
from downstream.data import ImageSet
from downstream.severity import feature_columns, feature_kind, fit_fold
from runkit.errors import UserError

METRIC = {"diagnosis": ("val_macro_f1", "max"), "severity": ("val_mse", "min")}


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its config; small and picklable."""

    task: str
    out_dir: str
    sweep: str
    backbone: str
    image_size: int
    backbone_seed: int = 0
    threads: int = 1
    wandb_mode: str = "disabled"
    wandb_project: str = "xray-genesis"
    gpus_per_trial: float = 0.0


# ----------------------------------------------------------------------------------------------- helpers


def seeded_backbone(spec: str, image_size: int | None, seed: int) -> Backbone:
    """The same weights in the driver and in every trial (a scratch backbone is random)."""
    torch.manual_seed(int(seed))
    return load_backbone(spec, image_size=image_size)


class FeatureBody(nn.Module):
    """Identity body: 'images' are precomputed pooled features shaped [N, D, 1, 1]."""

    def forward(self, x):
        return x


def feature_backbone(num_features: int, spec: str) -> Backbone:
    """A Backbone whose pooled output is its input, so `train_diagnosis(mode=linear)` trains a head on
    shared features without running (or even holding) the real backbone."""
    return Backbone(FeatureBody(), num_features, kind="features", arch=spec, image_size=1)


def features_as_images(features: np.ndarray, data: ImageSet) -> ImageSet:
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))[:, :, None, None]
    return ImageSet(x, data.targets, data.records)


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)[:120]


def trial_device(ctx: SweepContext) -> str:
    from downstream.device import trial_device as pick

    return pick(ctx.gpus_per_trial)


def _trial_tracker(ctx: SweepContext, config: dict):
    from ray import tune

    from runkit.tracking import Tracker

    tc = tune.get_context()
    trial_id = tc.get_trial_id() or "local"
    return Tracker(Path(ctx.out_dir) / "trials" / trial_id, config, project=ctx.wandb_project, group=ctx.sweep,
                   name=f"{ctx.sweep}-{trial_id}", job_type="trial", mode=ctx.wandb_mode,
                   resume_id=safe_id(f"{ctx.sweep}-{trial_id}"))


def _check_fail(config: dict, reports: int) -> None:
    """Fault injection for tests and demos: `fail: true` raises after the first report, `fail: N` after the N-th."""
    fail = config.get(FAULT_KEY)
    if fail is True or (not isinstance(fail, bool) and isinstance(fail, int) and fail > 0 and reports >= fail):
        raise RuntimeError(f"injected failure after report {reports} (config fail={fail!r})")


def _numeric(row: dict) -> dict:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float, np.floating, np.integer))
            and not isinstance(v, bool)}


# -------------------------------------------------------------------------------------- diagnosis trials


def diagnosis_trial_config(config: dict, ctx: SweepContext, device: str = "cpu") -> dict:
    cfg = {k: v for k, v in config.items() if k != FAULT_KEY}
    cfg.update(backbone=ctx.backbone, image_size=ctx.image_size, progress=False, device=device,
               num_threads=cfg.get("num_threads") or ctx.threads, scorecam_per_class=0)
    return cfg


def diagnosis_trainable(config: dict, ctx: SweepContext, data: ImageSet, splits: dict,
                        features: ImageSet | None = None) -> None:
    """One diagnosis trial: train on `train`, report validation metrics per epoch. The trial never sees
    the test images (its 'test' split is the validation split; the driver evaluates test once)."""
    from ray import tune

    from downstream.diagnosis import train_diagnosis

    device = trial_device(ctx)
    cfg = diagnosis_trial_config(config, ctx, device)
    trial_splits = {"train": splits["train"], "val": splits["val"], "test": splits["val"]}
    backbone = None
    if cfg.get("mode") == "linear" and features is not None:
        data, backbone = features, feature_backbone(int(features.images.shape[1]), ctx.backbone)
    tracker = _trial_tracker(ctx, config)
    state = {"reports": 0, "best": -np.inf}
    epochs = int(cfg.get("epochs") or 1)

    def report(row: dict) -> None:
        state["reports"] += 1
        metrics = _numeric(row)
        f1 = metrics.get("val_macro_f1", float("nan"))
        state["best"] = max(state["best"], f1) if np.isfinite(f1) else state["best"]
        metrics.update(best_val_macro_f1=state["best"], complete=float(int(row["epoch"]) >= epochs),
                       on_gpu=float(device.startswith("cuda")))
        tracker.log(metrics, step=int(row["epoch"]))
        tune.report(metrics)
        _check_fail(config, state["reports"])

    try:
        train_diagnosis(cfg, data=data, splits=trial_splits, backbone=backbone, report=report)
    finally:
        tracker.finish()


# --------------------------------------------------------------------------------------- severity trials


def resolve_severity_trial(config: dict) -> dict:
    """A trial's config as a validated SeverityConfig dict (the CLI's own keys), plus its named columns."""
    cfg = SeverityConfig.from_dict({k: v for k, v in config.items() if k != FAULT_KEY}, "severity trial").to_dict()
    cfg["columns"] = feature_columns(cfg["features"])
    return cfg


def severity_fold_metrics(feats: dict, targets: np.ndarray, cfg: dict, train_idx, eval_idx, groups) -> dict:
    """Fit the trial's regressor (downstream.severity.make_regressor, via fit_fold) on `train_idx` rows plus
    flipped copies and score `eval_idx`: {target: {mse, mae, pearson_r, r2}}."""
    from downstream.data import SEVERITY_TARGETS
    from downstream.metrics import regression_metrics

    pred, _ = fit_fold(feats, targets, cfg, train_idx, eval_idx, groups)
    y = np.asarray(targets, dtype=float)
    return {t: regression_metrics(y[np.asarray(eval_idx), SEVERITY_TARGETS.index(t)], pred[:, j])
            for j, t in enumerate(cfg["targets"])}


def severity_folds(groups: np.ndarray, pool: np.ndarray, folds: int, seed: int) -> list[tuple]:
    """Patient-grouped K folds over `pool` (train+val), as absolute indices."""
    from downstream.severity import _group_kfold

    g = np.asarray(groups)[pool]
    if len(set(g.tolist())) < 2:
        raise UserError("severity cross-validation needs at least 2 patients in train+val")
    k = max(2, min(int(folds), len(set(g.tolist()))))
    return [(pool[a], pool[b]) for a, b in _group_kfold(k, seed).split(np.zeros(len(pool)), groups=g)]


def compute_severity_features(backbone: Backbone, images: torch.Tensor, kinds, flips, batch_size: int = 32,
                              progress: bool = False, device: torch.device | str | None = None) -> dict:
    """{kind: extract_features(...)} for every kind the sweep (or one trial) needs."""
    from downstream.severity import FLIPS, extract_features

    flips = sorted({"none", *flips}, key=FLIPS.index)
    device = torch.device(device) if device is not None else None
    return {k: extract_features(backbone, images, k, flips=flips, batch_size=batch_size, progress=progress,
                                device=device) for k in sorted(set(kinds))}


def severity_trainable(config: dict, ctx: SweepContext, targets: np.ndarray, groups: np.ndarray, splits: dict,
                       features: dict | None = None, images: torch.Tensor | None = None) -> None:
    """One severity trial: K-fold CV on train+val, one report per fold (running mean validation MSE).

    `features` are the driver's shared features; without them (`images` given) the trial loads the backbone
    and extracts what it needs itself (on its GPU, if Ray gave it one), which is what sharing saves."""
    from ray import tune

    cfg = resolve_severity_trial(config)
    torch.set_num_threads(max(1, int(ctx.threads)))
    kind = feature_kind(cfg["features"])
    device = trial_device(ctx)
    if features is None:
        backbone = seeded_backbone(ctx.backbone, ctx.image_size, ctx.backbone_seed)
        features = compute_severity_features(backbone, images, [kind], FLIP_SETS[str(cfg["flip"])],
                                             batch_size=int(cfg["batch_size"]), device=device)
    feats = features[kind]
    pool = np.sort(np.concatenate([splits["train"], splits["val"]]))
    folds = severity_folds(groups, pool, int(cfg["folds"]), int(cfg["seed"]))
    tracker = _trial_tracker(ctx, config)
    per_target: dict[str, list] = {t: [] for t in cfg["targets"]}
    try:
        for k, (tr, te) in enumerate(folds, start=1):
            res = severity_fold_metrics(feats, targets, cfg, tr, te, groups)
            for t in cfg["targets"]:
                per_target[t].append(res[t]["mse"])
            metrics = {f"val_mse_{t}": float(np.mean(v)) for t, v in per_target.items()}
            metrics.update(val_mse=float(np.mean([metrics[f"val_mse_{t}"] for t in cfg["targets"]])),
                           fold=k, fold_mse=float(np.mean([res[t]["mse"] for t in cfg["targets"]])),
                           complete=float(k == len(folds)), on_gpu=float(device.startswith("cuda")))
            tracker.log(metrics, step=k)
            tune.report(metrics)
            _check_fail(config, k)
    finally:
        tracker.finish()
