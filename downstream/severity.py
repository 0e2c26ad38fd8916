"""Severity regression on a frozen backbone (seed 000; Cohen et al. 2020).

Two steps, so a sweep pays for the backbone once:
1. `extract_features(backbone, images, kind)` -> {"names", "none", "h", "v", "hv"}: numpy arrays of
   pooled features or pathology logits for the image and its flips (flips serve as train-time feature
   augmentation and as test-time averaging), computed on the job's device;
2. `fit_severity_head(features, targets, config, groups=...)` -> metrics: repeated patient-grouped
   splits (GroupShuffleSplit, default 8:2 x 50), one regressor per target from `make_regressor`
   (linear | ridge | mlp), predictions clipped to the score range, MSE / MAE / Pearson r / R² mean ± sd
   beside the mean-predictor baseline.

One vocabulary (downstream.config.SeverityConfig) for the CLI, YAML and sweeps: `alpha` (one value, or
several for the ridge to choose from), `flip` (none | h | v | hv), `repeats`/`test_size` (outer splits),
`folds` (a sweep's CV), `inner_folds` (the ridge's alpha CV).

The ridge's inner CV is patient-grouped (`GroupedRidge`): the flipped copies of an image and the other
images of its patient are held out together, so alpha is not chosen by how well a row predicts its own
flipped twin (leave-one-out over such rows favours tiny alphas).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from downstream.backbones import Backbone, select_pathologies
from downstream.config import FLIP_SETS, SeverityConfig
from downstream.data import SEVERITY_TARGETS, ImageSet, load_shards, severity_target
from downstream.metrics import fmt_mean_sd, mean_sd, regression_metrics
from runkit.errors import UserError
from runkit.jsonsafe import to_jsonable
from shards.record import SEVERITY_RANGES

FLIPS = ("none", "h", "v", "hv")
FEATURE_KINDS = ("pooled", "multiscale", "pathologies")
METRICS = ("mse", "mae", "pearson_r", "r2")
WHOLE = ("pooled", "multiscale", "pathologies", "all")


def resolve_severity(config) -> dict:
    """A SeverityConfig or mapping of its keys, validated -> plain dict."""
    if isinstance(config, SeverityConfig):
        return config.to_dict()
    return SeverityConfig.from_dict({k: v for k, v in (config or {}).items() if k != "columns"},
                                    "severity config").to_dict() | {"columns": (config or {}).get("columns")}


def feature_kind(features: str) -> str:
    """The extractor a `features` value needs: pooled, multiscale, or pathologies (all/subsets of named outputs)."""
    return str(features) if str(features) in ("pooled", "multiscale") else "pathologies"


def feature_columns(features: str) -> str | None:
    """The named-output subset a `features` value asks for (None: every column of its kind)."""
    return None if str(features) in WHOLE else str(features)


def needs_named_outputs(features: str) -> bool:
    return feature_kind(features) == "pathologies"


@torch.no_grad()
def extract_features(backbone: Backbone, images: torch.Tensor, kind: str = "pooled", *,
                     flips=FLIPS, batch_size: int = 32, progress: bool = False,
                     device: torch.device | None = None) -> dict:
    """Frozen features for every flip: {"names": [...], flip: float32 array [N, D]}.

    `kind`: "pooled" (the GAP vector of the last stage, e.g. 1024-d for DenseNet-121), "multiscale" (the
    GAP vectors of every encoder stage, shallow -> deep, concatenated: e.g. 64+64+128+256+512 for ResNet-18;
    see `downstream.scorecam.stage_maps`) or "pathologies" (all named outputs; pick subsets later with
    `columns` in `fit_severity_head`). uint8 batches move to `device` (default: the backbone's) before
    conversion; forward passes run there (bf16 autocast on CUDA); the arrays come back float32.
    """
    from tqdm import tqdm

    from downstream.device import autocast, to_float
    from downstream.scorecam import stage_maps

    if kind not in FEATURE_KINDS:
        raise UserError(f"feature kind {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
    if kind == "pathologies" and backbone.pathology_names is None:
        raise UserError(f"backbone {backbone.kind}:{backbone.arch} has no pathology outputs "
                        "(use xrv:FILE, chexnet:FILE or nih14:DIR, or --features pooled)")
    if device is None:
        p = next(backbone.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    backbone.to(device).eval()
    widths: list[int] = []

    def multiscale(x):
        pooled = [m.float().mean(dim=(2, 3)) for m in stage_maps(backbone, x)]
        widths[:] = [p.shape[1] for p in pooled]
        return torch.cat(pooled, 1)

    fn = {"pooled": backbone.pooled, "multiscale": multiscale, "pathologies": backbone.pathologies}[kind]
    out = {f: [] for f in flips}
    steps = range(0, len(images), batch_size)
    for s in tqdm(steps, desc="severity features", unit="batch", leave=False, disable=not progress):
        x = to_float(images[s:s + batch_size], device)
        for f in flips:
            xf = x.flip(3) if "h" in f else x
            xf = xf.flip(2) if "v" in f else xf
            with autocast(device):
                out[f].append(fn(xf).float().cpu().numpy())
    if kind == "pathologies":
        names = list(backbone.pathology_names)
    elif kind == "multiscale":
        names = [f"s{s}_f{i}" for s, w in enumerate(widths, 1) for i in range(w)]
    else:
        names = [f"f{i}" for i in range(backbone.num_features)]
    return {"names": names, **{f: np.concatenate(v) for f, v in out.items()}}


def _columns(features: dict, columns) -> np.ndarray | slice:
    if columns in (None, "") or columns in WHOLE:
        return slice(None)
    return np.asarray(select_pathologies(tuple(features["names"]), columns), dtype=int)


# ------------------------------------------------------------------------------------------ regressors


def _group_kfold(k: int, seed: int):
    from sklearn.model_selection import GroupKFold

    try:
        return GroupKFold(n_splits=k, shuffle=True, random_state=int(seed))
    except TypeError:  # scikit-learn < 1.6 has no shuffling GroupKFold
        return GroupKFold(n_splits=k)


def _scale(x_tr: np.ndarray, *others):
    mean = x_tr.mean(0)
    std = x_tr.std(0)
    std[std < 1e-12] = 1.0
    return [(a - mean) / std for a in (x_tr, *others)]


def _thin_svd(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u [n, r], sv [r], vt [r, d]) of xs over its numerically nonzero singular values, from the eigen-
    decomposition of the smaller Gram matrix. In the demo's severity stage (DenseNet-121 features) OpenBLAS's
    SVD took 0.40 s per call here and this eigh 0.11 s, and a severity run does a dozen per split. Singular values below 1e-7 of
    the largest (where the Gram's rounding dominates) are dropped; ridge gives them weight sv/alpha, ~0."""
    n, dim = xs.shape
    gram = xs @ xs.T if n <= dim else xs.T @ xs
    w, vecs = np.linalg.eigh(gram)
    keep = w > 1e-14 * max(w.max(initial=0.0), 1e-300)
    sv, vecs = np.sqrt(w[keep]), vecs[:, keep]
    if n <= dim:
        return vecs, sv, (vecs.T @ xs) / sv[:, None]
    return (xs @ vecs) / sv, sv, vecs.T


def ridge_path(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, alphas) -> np.ndarray:
    """Predictions [A, n_te, T] of standardised ridge (intercept unpenalised) for every alpha, from one
    thin SVD: the same model as StandardScaler + sklearn Ridge(alpha)."""
    xs, xt = _scale(np.asarray(x_tr, float), np.asarray(x_te, float))
    y = np.asarray(y_tr, float).reshape(len(y_tr), -1)
    y_mean = y.mean(0)
    u, sv, vt = _thin_svd(xs)
    uty = u.T @ (y - y_mean)                         # [r, T]
    proj = xt @ vt.T                                  # [n_te, r]
    d = sv / (sv ** 2 + np.asarray(alphas, float)[:, None])  # [A, r]
    return np.einsum("nr,ar,rt->ant", proj, d, uty) + y_mean


class GroupedRidge:
    """Standardised ridge per target whose alpha (from `alphas`) is chosen by patient-grouped K-fold CV
    over the training rows: rows that share a group (an image's flipped copies, a patient's images)
    are always held out together. One alpha: no CV. `alpha_` holds the chosen alpha per target."""

    def __init__(self, alphas, inner_folds: int = 5, seed: int = 0):
        self.alphas = np.array(sorted(float(a) for a in alphas))
        self.inner_folds, self.seed = int(inner_folds), int(seed)

    def fit(self, x: np.ndarray, y: np.ndarray, groups) -> GroupedRidge:
        y = np.asarray(y, float).reshape(len(y), -1)
        groups = np.asarray(groups)
        n_groups = len(np.unique(groups))
        if len(self.alphas) == 1 or n_groups < 2:
            self.alpha_ = np.full(y.shape[1], self.alphas[-1] if n_groups < 2 else self.alphas[0])
            self.cv_mse_ = None
        else:
            k = max(2, min(self.inner_folds, n_groups))
            err = np.zeros((len(self.alphas), y.shape[1]))
            for tr, te in _group_kfold(k, self.seed).split(x, groups=groups):
                pred = ridge_path(x[tr], y[tr], x[te], self.alphas)
                err += ((pred - y[te][None]) ** 2).sum(1)
            self.cv_mse_ = err / len(y)
            # the largest alpha among the best (ties: the simpler model)
            best = err.min(0)
            self.alpha_ = np.array([self.alphas[np.flatnonzero(err[:, t] <= best[t] * (1 + 1e-9))[-1]]
                                    for t in range(y.shape[1])])
        self._x, self._y = np.asarray(x, float), y
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        alphas = sorted(set(self.alpha_.tolist()))
        path = ridge_path(self._x, self._y, x, alphas)  # one SVD for every target and its alpha
        return np.stack([path[alphas.index(a), :, t] for t, a in enumerate(self.alpha_)], 1)


class _PerTarget:
    """sklearn regressors fitted one per target column (linear | mlp), the groups unused."""

    def __init__(self, make):
        self.make = make

    def fit(self, x, y, groups=None):
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        y = np.asarray(y, float).reshape(len(y), -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.models_ = [self.make().fit(x, y[:, t]) for t in range(y.shape[1])]
        self.alpha_ = None
        return self

    def predict(self, x):
        return np.stack([m.predict(x) for m in self.models_], 1)


def make_regressor(cfg: dict):
    """The one regressor factory: linear (least squares) | ridge (GroupedRidge over `alpha`) | mlp
    (standardised sklearn MLPRegressor, one hidden layer of `hidden`, L2 = alpha[0]). All have
    fit(x, y[n, T], groups) and predict(x) -> [n, T]."""
    alphas = cfg["alpha"] if isinstance(cfg["alpha"], (list, tuple)) else [cfg["alpha"]]
    if cfg["regressor"] == "linear":
        from sklearn.linear_model import LinearRegression

        return _PerTarget(LinearRegression)
    if cfg["regressor"] == "ridge":
        return GroupedRidge(alphas, int(cfg["inner_folds"]), int(cfg["seed"]))
    if cfg["regressor"] == "mlp":
        from sklearn.neural_network import MLPRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return _PerTarget(lambda: make_pipeline(StandardScaler(), MLPRegressor(
            hidden_layer_sizes=(int(cfg["hidden"]),), alpha=float(alphas[0]), max_iter=int(cfg["max_iter"]),
            early_stopping=False, random_state=int(cfg["seed"]))))
    raise UserError(f"regressor {cfg['regressor']!r} is not linear, ridge or mlp")


# ------------------------------------------------------------------------------------------ protocol


def repeated_splits(groups, repeats: int, test_size: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`repeats` patient-grouped random splits (GroupShuffleSplit): (train, test) index arrays."""
    from sklearn.model_selection import GroupShuffleSplit

    groups = np.asarray(groups)
    if len(np.unique(groups)) < 2:
        raise UserError("severity splits need images of at least 2 patients")
    gss = GroupShuffleSplit(n_splits=int(repeats), test_size=float(test_size), random_state=int(seed))
    return list(gss.split(np.zeros(len(groups)), groups=groups))


def fit_fold(features: dict, targets: np.ndarray, cfg: dict, train_idx, test_idx, groups) -> tuple[np.ndarray, list]:
    """Fit on `train_idx` (plus its flipped copies, which keep their image's group) and predict `test_idx`
    (averaged over the flips with `tta`), clipped to each target's range: ([n_test, T] predictions,
    the chosen alpha per target or None)."""
    cols = _columns(features, cfg.get("columns"))
    tr, te = np.asarray(train_idx), np.asarray(test_idx)
    flips = ["none"] + list(FLIP_SETS[str(cfg["flip"])])
    tta = flips if cfg["tta"] else ["none"]
    ti = [SEVERITY_TARGETS.index(t) for t in cfg["targets"]]
    y = np.asarray(targets, dtype=float)[:, ti]
    g = np.asarray(groups)
    missing = [f for f in flips if f not in features]
    if missing:
        raise UserError(f"flip {cfg['flip']!r} needs features of the {', '.join(missing)} flip(s), which were not "
                        "extracted")
    x_tr = np.concatenate([features[f][tr][:, cols] for f in flips])
    reg = make_regressor(cfg).fit(x_tr, np.tile(y[tr], (len(flips), 1)), np.tile(g[tr], len(flips)))
    pred = np.mean([reg.predict(features[f][te][:, cols]) for f in tta], axis=0)
    lo = np.array([SEVERITY_RANGES[t][0] for t in cfg["targets"]])
    hi = np.array([SEVERITY_RANGES[t][1] for t in cfg["targets"]])
    alphas = None if reg.alpha_ is None else [float(a) for a in reg.alpha_]
    return np.clip(pred, lo, hi), alphas


def fit_severity_head(features: dict, targets: np.ndarray, config=None, *, groups=None,
                      splits: list | None = None) -> dict:
    """Cheap head fitting on precomputed features; see the module docstring.

    `targets` is [N, 2] (geographic_mean, opacity_mean). `config["columns"]` picks named outputs
    (e.g. "lung_opacity,pneumonia"). `groups` are patient groups (default: one per image). `splits`
    (a list of (train_idx, test_idx)) replaces the repeated GroupShuffleSplit, e.g. for a fixed validation
    split in a sweep. Returns per-target model and baseline metrics (mean ± sd), the per-repeat rows, the
    ridge's chosen alphas, and per-image predictions averaged over the repeats.
    """
    cfg = resolve_severity(config)
    cols = _columns(features, cfg.get("columns"))
    y_all = np.asarray(targets, dtype=float)
    n = len(y_all)
    if n < 5:
        raise UserError(f"severity regression needs at least 5 scored images, got {n}")
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if splits is None:
        splits = repeated_splits(groups, cfg["repeats"], cfg["test_size"], cfg["seed"])
    result = {"n": n, "repeats": len(splits), "features": len(features["names"]) if isinstance(cols, slice) else
              len(cols), "regressor": cfg["regressor"], "flip": cfg["flip"], "targets": {}}
    rows = {t: ([], []) for t in cfg["targets"]}
    sums = {t: (np.zeros(n), np.zeros(n)) for t in cfg["targets"]}
    chosen = {t: [] for t in cfg["targets"]}
    for tr, te in splits:
        pred, alphas = fit_fold(features, y_all, cfg, tr, te, groups)
        for j, t in enumerate(cfg["targets"]):
            y = y_all[:, SEVERITY_TARGETS.index(t)]
            rows[t][0].append(regression_metrics(y[te], pred[:, j]))
            rows[t][1].append(regression_metrics(y[te], np.full(len(te), y[tr].mean())))
            sums[t][0][te] += pred[:, j]
            sums[t][1][te] += 1
            if alphas is not None:
                chosen[t].append(alphas[j])
    for t in cfg["targets"]:
        y = y_all[:, SEVERITY_TARGETS.index(t)]
        rows_model, rows_base = rows[t]
        pred_sum, pred_cnt = sums[t]
        seen = pred_cnt > 0
        result["targets"][t] = {
            "model": {m: mean_sd([r[m] for r in rows_model]) for m in METRICS},
            "baseline": {m: mean_sd([r[m] for r in rows_base]) for m in METRICS},
            "alpha": chosen[t] or None,
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


def run_severity(config, *, data: ImageSet | None = None, backbone: Backbone | None = None) -> tuple[dict, dict]:
    """Load (or take) data and backbone, extract features once on the job's device, fit; returns
    (result, resolved config)."""
    from downstream.backbones import load_backbone
    from downstream.device import parse_device

    cfg = resolve_severity(config)
    device = parse_device(cfg["device"])
    if backbone is None:
        torch.manual_seed(int(cfg["seed"]))
        backbone = load_backbone(cfg["backbone"], image_size=cfg["image_size"])
    if data is None:
        if not cfg["shards"]:
            raise UserError("severity needs --shards with severity-scored images")
        data = load_severity_data(cfg["shards"], int(cfg["image_size"] or backbone.image_size))
    kind = feature_kind(cfg["features"])
    flips = sorted({"none", *FLIP_SETS[cfg["flip"]]}, key=FLIPS.index)
    feats = extract_features(backbone, data.images, kind, flips=flips, batch_size=int(cfg["batch_size"]),
                             progress=bool(cfg["progress"]), device=device)
    cfg["columns"] = feature_columns(cfg["features"])
    result = fit_severity_head(feats, data.targets, cfg, groups=data.groups)
    result["feature_names"] = feats["names"] if cfg["columns"] is None or kind != "pathologies" else \
        [feats["names"][i] for i in _columns(feats, cfg["columns"])]
    cfg["device"] = str(device)
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
               "regressor": cfg["regressor"], "alpha": cfg["alpha"], "flip": cfg["flip"], "tta": cfg["tta"],
               "device": cfg["device"], **slim,
               "files": files}
    atomic_write_json(out / "metrics.json", to_jsonable(metrics))
    if tracker is not None:
        for t, r in result["targets"].items():
            tracker.summary({f"{t}/{who}_{k}": r[who][k]["mean"] for who in ("model", "baseline") for k in METRICS})
    return files
