"""Severity regression on a frozen backbone (seed 000; Cohen et al. 2020).

Two steps, so a sweep pays for the backbone once:
1. `extract_features(backbone, images, kind)` -> {"names", "none", "h", "v", "hv"}: numpy arrays of
   pooled features or pathology logits for the image and its flips (flips serve as train-time feature
   augmentation and as test-time averaging);
2. `fit_severity_head(features, targets, config, groups=...)` -> metrics: repeated patient-grouped
   splits (GroupShuffleSplit, default 8:2 x 50), linear or ridge (CV alpha) per target, predictions
   clipped to the score range, MSE / MAE / Pearson r / R² mean ± sd beside the mean-predictor baseline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from downstream.backbones import Backbone, select_pathologies
from downstream.data import SEVERITY_TARGETS, ImageSet, load_shards, severity_target
from downstream.metrics import fmt_mean_sd, mean_sd, regression_metrics, to_jsonable
from runkit.errors import UserError
from shards.record import SEVERITY_RANGES

FLIPS = ("none", "h", "v", "hv")
FEATURE_KINDS = ("pooled", "multiscale", "pathologies")
METRICS = ("mse", "mae", "pearson_r", "r2")

SEVERITY_DEFAULTS = {
    "backbone": "scratch:densenet121", "shards": None, "image_size": None,
    "features": "pooled",          # pooled | multiscale | pathologies (all outputs) | comma list of output names
    "regressor": "ridge",          # ridge (RidgeCV over `alphas`) | linear
    "alphas": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0],
    "targets": list(SEVERITY_TARGETS),
    "train_flips": ["h", "v"],     # extra flipped copies of the training rows
    "tta": True,                   # average test predictions over the unflipped image and train_flips
    "test_size": 0.2, "repeats": 50, "seed": 0, "batch_size": 32, "progress": True,
}


def resolve_severity(config: dict | None) -> dict:
    cfg = {**SEVERITY_DEFAULTS, **{k: v for k, v in (config or {}).items() if v is not None}}
    if cfg["regressor"] not in ("ridge", "linear"):
        raise UserError(f"regressor {cfg['regressor']!r} is not ridge or linear")
    if isinstance(cfg["targets"], str):
        cfg["targets"] = [t for t in cfg["targets"].split(",") if t]
    bad = [t for t in cfg["targets"] if t not in SEVERITY_TARGETS]
    if bad:
        raise UserError(f"unknown severity target(s) {bad}; use {', '.join(SEVERITY_TARGETS)}")
    if isinstance(cfg["train_flips"], str):
        cfg["train_flips"] = [f for f in cfg["train_flips"].split(",") if f and f != "none"]
    bad = [f for f in cfg["train_flips"] if f not in FLIPS[1:]]
    if bad:
        raise UserError(f"unknown flip(s) {bad}; use h, v, hv")
    if not 0 < float(cfg["test_size"]) < 1 or int(cfg["repeats"]) < 1:
        raise UserError("test_size must be in (0, 1) and repeats at least 1")
    return cfg


@torch.no_grad()
def extract_features(backbone: Backbone, images: torch.Tensor, kind: str = "pooled", *,
                     flips=FLIPS, batch_size: int = 32, progress: bool = False) -> dict:
    """Frozen features for every flip: {"names": [...], flip: float32 array [N, D]}.

    `kind`: "pooled" (the GAP vector of the last stage, e.g. 1024-d for DenseNet-121), "multiscale" (the
    GAP vectors of every encoder stage, shallow -> deep, concatenated: e.g. 64+64+128+256+512 for ResNet-18;
    see `downstream.scorecam.stage_maps`) or "pathologies" (all named outputs; pick subsets later with
    `columns` in `fit_severity_head`).
    """
    from tqdm import tqdm

    from downstream.scorecam import stage_maps

    if kind not in FEATURE_KINDS:
        raise UserError(f"feature kind {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
    if kind == "pathologies" and backbone.pathology_names is None:
        raise UserError(f"backbone {backbone.kind}:{backbone.arch} has no pathology outputs "
                        "(use xrv:FILE, chexnet:FILE or nih14:DIR, or --features pooled)")
    backbone.eval()
    widths: list[int] = []

    def multiscale(x):
        pooled = [m.mean(dim=(2, 3)) for m in stage_maps(backbone, x)]
        widths[:] = [p.shape[1] for p in pooled]
        return torch.cat(pooled, 1)

    fn = {"pooled": backbone.pooled, "multiscale": multiscale, "pathologies": backbone.pathologies}[kind]
    out = {f: [] for f in flips}
    steps = range(0, len(images), batch_size)
    for s in tqdm(steps, desc="severity features", unit="batch", leave=False, disable=not progress):
        x = images[s:s + batch_size]
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        for f in flips:
            xf = x.flip(3) if "h" in f else x
            xf = xf.flip(2) if "v" in f else xf
            out[f].append(fn(xf).float().numpy())
    if kind == "pathologies":
        names = list(backbone.pathology_names)
    elif kind == "multiscale":
        names = [f"s{s}_f{i}" for s, w in enumerate(widths, 1) for i in range(w)]
    else:
        names = [f"f{i}" for i in range(backbone.num_features)]
    return {"names": names, **{f: np.concatenate(v) for f, v in out.items()}}


def _columns(features: dict, columns) -> np.ndarray | slice:
    if columns in (None, "", "all", "pooled", "multiscale", "pathologies"):
        return slice(None)
    return np.asarray(select_pathologies(tuple(features["names"]), columns), dtype=int)


def _regressor(cfg: dict):
    from sklearn.linear_model import LinearRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if cfg["regressor"] == "linear":
        return LinearRegression()
    return make_pipeline(StandardScaler(), RidgeCV(alphas=[float(a) for a in cfg["alphas"]]))


def fit_severity_head(features: dict, targets: np.ndarray, config: dict | None = None, *, groups=None,
                      splits: list | None = None) -> dict:
    """Cheap head fitting on precomputed features; see the module docstring.

    `targets` is [N, 2] (geographic_mean, opacity_mean). `config["columns"]` picks named outputs
    (e.g. "lung_opacity,pneumonia"). `splits` (a list of (train_idx, test_idx)) replaces the repeated
    GroupShuffleSplit, e.g. for a fixed validation split in a sweep. Returns per-target model and baseline
    metrics (mean ± sd), the per-repeat rows, and per-image predictions averaged over the repeats.
    """
    from sklearn.model_selection import GroupShuffleSplit

    cfg = resolve_severity(config)
    cols = _columns(features, cfg.get("columns"))
    y_all = np.asarray(targets, dtype=float)
    n = len(y_all)
    if n < 5:
        raise UserError(f"severity regression needs at least 5 scored images, got {n}")
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if splits is None:
        gss = GroupShuffleSplit(n_splits=int(cfg["repeats"]), test_size=float(cfg["test_size"]),
                                random_state=int(cfg["seed"]))
        splits = list(gss.split(np.zeros(n), groups=groups))
    flips = ["none"] + [f for f in cfg["train_flips"] if f != "none"]
    tta = flips if cfg["tta"] else ["none"]
    result = {"n": n, "repeats": len(splits), "features": len(features["names"]) if isinstance(cols, slice) else
              len(cols), "targets": {}}
    for t in cfg["targets"]:
        ti = SEVERITY_TARGETS.index(t)
        lo, hi = SEVERITY_RANGES[t]
        y = y_all[:, ti]
        rows_model, rows_base = [], []
        pred_sum, pred_cnt = np.zeros(n), np.zeros(n)
        for tr, te in splits:
            x_tr = np.concatenate([features[f][tr][:, cols] for f in flips])
            reg = _regressor(cfg).fit(x_tr, np.tile(y[tr], len(flips)))
            pred = np.mean([reg.predict(features[f][te][:, cols]) for f in tta], axis=0)
            pred = np.clip(pred, lo, hi)
            rows_model.append(regression_metrics(y[te], pred))
            rows_base.append(regression_metrics(y[te], np.full(len(te), y[tr].mean())))
            pred_sum[te] += pred
            pred_cnt[te] += 1
        seen = pred_cnt > 0
        result["targets"][t] = {
            "model": {m: mean_sd([r[m] for r in rows_model]) for m in METRICS},
            "baseline": {m: mean_sd([r[m] for r in rows_base]) for m in METRICS},
            "per_repeat": {"model": rows_model, "baseline": rows_base},
            "predictions": {"index": np.flatnonzero(seen).tolist(), "true": y[seen].tolist(),
                            "pred": (pred_sum[seen] / pred_cnt[seen]).tolist()},
        }
    return result


def table(result: dict) -> str:
    """Markdown table: one row per (target, model | mean predictor)."""
    lines = ["| target | predictor | MSE | MAE | Pearson r | R² |", "|---|---|---|---|---|---|"]
    for t, r in result["targets"].items():
        for who, label in (("model", "frozen features"), ("baseline", "mean predictor")):
            m = r[who]
            lines.append(f"| {t} | {label} | " + " | ".join(fmt_mean_sd(m[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def load_severity_data(shards, image_size: int, **kw) -> ImageSet:
    data = load_shards(shards, severity_target, image_size=image_size, desc="severity shards", **kw)
    return data


def run_severity(config: dict, *, data: ImageSet | None = None, backbone: Backbone | None = None) -> tuple[dict, dict]:
    """Load (or take) data and backbone, extract features once, fit; returns (result, resolved config)."""
    from downstream.backbones import load_backbone

    cfg = resolve_severity(config)
    if backbone is None:
        torch.manual_seed(int(cfg["seed"]))
        backbone = load_backbone(cfg["backbone"], image_size=cfg["image_size"])
    if data is None:
        if not cfg["shards"]:
            raise UserError("severity needs --shards with severity-scored images")
        data = load_severity_data(cfg["shards"], int(cfg["image_size"] or backbone.image_size))
    spec = str(cfg["features"])
    kind = spec if spec in ("pooled", "multiscale") else "pathologies"
    flips = sorted(set(["none"] + cfg["train_flips"]), key=FLIPS.index)
    feats = extract_features(backbone, data.images, kind, flips=flips, batch_size=int(cfg["batch_size"]),
                             progress=bool(cfg["progress"]))
    cfg["columns"] = None if spec in ("pooled", "multiscale", "pathologies", "all") else spec
    result = fit_severity_head(feats, data.targets, cfg, groups=data.groups)
    result["feature_names"] = feats["names"] if cfg["columns"] is None or kind != "pathologies" else \
        [feats["names"][i] for i in _columns(feats, cfg["columns"])]
    return result, cfg


def write_outputs(result: dict, cfg: dict, out_dir: str | Path, tracker=None) -> dict:
    from downstream import plots
    from runkit.atomic import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for t, r in result["targets"].items():
        lim = SEVERITY_RANGES[t][1]
        m = r["model"]
        files[f"scatter_{t}"] = str(plots.scatter_png(
            r["predictions"]["true"], r["predictions"]["pred"], out / f"scatter_{t}.png", label=t, lim=lim,
            title=f"{t}: MSE {m['mse']['mean']:.2f}, r {m['pearson_r']['mean']:.2f} "
                  f"({result['repeats']} splits)"))
    files["table"] = str(atomic_write_text(out / "severity_table.md", table(result) + "\n"))
    slim = {k: v for k, v in result.items() if k != "targets"}
    slim["targets"] = {t: {k: v for k, v in r.items() if k != "per_repeat"} for t, r in result["targets"].items()}
    metrics = {"task": "severity", "backbone": cfg["backbone"], "features": cfg["features"],
               "regressor": cfg["regressor"], "train_flips": cfg["train_flips"], "tta": cfg["tta"], **slim,
               "files": files}
    atomic_write_json(out / "metrics.json", to_jsonable(metrics))
    if tracker is not None:
        for t, r in result["targets"].items():
            tracker.summary({f"{t}/{who}_{k}": r[who][k]["mean"] for who in ("model", "baseline") for k in METRICS})
    return files
