"""Online probes: does the encoder being pretrained hold more label information than its random init?

At step 0 (the random-init reference) and every `--probe-every` steps, rank 0 freezes the current encoder,
extracts pooled (GAP of the deepest stage) and multiscale (GAP of every stage, concatenated) features of a
small labelled probe set, and scores fast probes on them with patient-grouped cross-validation:
- diagnosis (covid / pneumonia / normal, or normal / pneumonia from NIH findings): logistic regression
  (macro-AUROC, balanced accuracy) and a kNN (balanced accuracy);
- NIH findings (multi-label): one logistic regression per finding (mean AUROC);
- severity (geographic extent, opacity): ridge regression and a kNN (MSE, and the fold-mean predictor's).

Whatever labels the probe records hold are used; a task without enough labelled patients is left out.
Metric names: `probe/<features>/<task>_<metric>` (e.g. `probe/multiscale/diagnosis_auroc`); the step-0
values are kept in `RUN/probe_reference.json` and logged beside every later probe as `probe_ref/...`, so
the plots show the random-init line. Probes are a CPU cost on rank 0 (the other ranks wait): each run
prints its seconds and the running fraction of the training time (`probe/cost_fraction`).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runkit.errors import UserError

FEATURES = ("pooled", "multiscale")
LOWER_IS_BETTER = ("_mse",)       # metric suffixes where a drop is a gain
MIN_GROUPS = 6                    # patients a task needs before it is probed
REFERENCE_FILE = "probe_reference.json"


# ------------------------------------------------------------------------------------------ probe set

def probe_target(rec: dict) -> np.ndarray | None:
    """[diagnosis index or -1, 14 NIH findings (NaN: unknown), 2 severity scores (NaN)]; None if unlabelled."""
    from downstream.data import diagnosis_target, findings_target, severity_target
    from shards.record import NIH_FINDINGS

    dx, fi, sev = diagnosis_target(rec), findings_target(rec), severity_target(rec)
    if dx is None and fi is None and sev is None:
        return None
    out = np.full(1 + len(NIH_FINDINGS) + 2, np.nan, dtype=np.float32)
    out[0] = -1 if dx is None else dx
    if fi is not None:
        out[1:1 + len(NIH_FINDINGS)] = fi
    if sev is not None:
        out[-2:] = sev
    return out


@dataclass
class ProbeSet:
    images: torch.Tensor      # uint8 [N,1,S,S]
    targets: np.ndarray       # [N, 17] as probe_target
    groups: np.ndarray        # patient groups
    splits: np.ndarray | None = None  # the records' own split names (train/val/test), where they have them

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def diagnosis(self) -> np.ndarray:
        return self.targets[:, 0].astype(int)

    @property
    def findings(self) -> np.ndarray:
        return self.targets[:, 1:-2]

    @property
    def severity(self) -> np.ndarray:
        return self.targets[:, -2:]

    def describe(self) -> str:
        n_dx = int((self.diagnosis >= 0).sum())
        n_fi = int((~np.isnan(self.findings[:, 0])).sum())
        n_sev = int((~np.isnan(self.severity[:, 0])).sum())
        return (f"{len(self)} images of {len(np.unique(self.groups))} patients (diagnosis {n_dx}, "
                f"findings {n_fi}, severity {n_sev})")


def load_probe_set(spec, *, image_size: int, max_samples: int | None = None, seed: int = 0) -> ProbeSet:
    """The labelled records of `spec` (shards), at most `max_samples` whole patients' worth (a seeded draw)."""
    from downstream.data import load_shards

    data = load_shards(spec, probe_target, image_size=image_size, desc="loading probe shards", rank=0,
                       world_size=1)  # the whole set, whichever rank asks
    groups, splits = data.groups, data.splits
    if max_samples is not None and len(data) > max_samples:
        rng = np.random.default_rng(seed)
        keep, n = [], 0
        for g in rng.permutation(np.unique(groups)):
            idx = np.flatnonzero(groups == g)
            if n + len(idx) > max_samples and keep:
                continue
            keep.append(idx)
            n += len(idx)
        pick = np.sort(np.concatenate(keep))
        data, groups, splits = data.subset(pick), groups[pick], splits[pick]
    return ProbeSet(data.images, np.asarray(data.targets, dtype=np.float32), groups, splits)


# ------------------------------------------------------------------------------------------- features

@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, images: torch.Tensor, *, device: torch.device,
                     input_dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None,
                     batch_size: int = 64) -> dict[str, np.ndarray]:
    """{"pooled": [N, C_last], "multiscale": [N, sum C]} float32 features of uint8 `images`, from an smp
    encoder (or its CBAM wrapper) in eval mode; the caller restores train mode."""
    encoder.eval()
    pooled, multi = [], []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device, non_blocking=True).float().div_(255.0).to(input_dtype)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with ctx:
            stages = list(encoder(x))[1:]  # stage 0 is the input itself
        gaps = [f.float().mean(dim=(2, 3)) for f in stages]
        pooled.append(gaps[-1].cpu())
        multi.append(torch.cat(gaps, 1).cpu())
    return {"pooled": torch.cat(pooled).numpy(), "multiscale": torch.cat(multi).numpy()}


# --------------------------------------------------------------------------------------------- probes

def _folds(groups: np.ndarray, y: np.ndarray | None, k: int, seed: int):
    """Patient-grouped folds (stratified by class when `y` is given): a list of (train, test) indices."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    k = min(k, len(np.unique(groups)))
    if y is not None:
        split = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(groups, y, groups)
    else:
        try:
            split = GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(groups, groups=groups)
        except TypeError:  # scikit-learn < 1.6
            split = GroupKFold(n_splits=k).split(groups, groups=groups)
    return list(split)


def _standardise(x_tr: np.ndarray, x_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std < 1e-8] = 1.0
    return (x_tr - mean) / std, (x_te - mean) / std


def _classify(x: np.ndarray, y: np.ndarray, folds, *, c: float, knn: int, n_classes: int):
    """Out-of-fold class probabilities of a logistic regression and of a cosine kNN."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    p_lr = np.zeros((len(y), n_classes))
    p_knn = np.zeros((len(y), n_classes))
    for tr, te in folds:
        a, b = _standardise(x[tr], x[te])
        classes = np.unique(y[tr])
        if len(classes) < 2:
            p_lr[te] = p_knn[te] = np.bincount(y[tr], minlength=n_classes) / len(tr)
            continue
        lr = LogisticRegression(C=c, max_iter=300, tol=1e-3).fit(a, y[tr])
        p_lr[np.ix_(te, classes)] = lr.predict_proba(b)
        nn = KNeighborsClassifier(n_neighbors=min(knn, len(tr)), metric="cosine").fit(a, y[tr])
        p_knn[np.ix_(te, classes)] = nn.predict_proba(b)
    return p_lr, p_knn


def _regress(x: np.ndarray, y: np.ndarray, folds, *, knn: int):
    """Out-of-fold predictions of a ridge (alpha by internal CV), a kNN and the fold-mean predictor."""
    from sklearn.linear_model import RidgeCV
    from sklearn.neighbors import KNeighborsRegressor

    p_ridge, p_knn, p_mean = (np.zeros_like(y) for _ in range(3))
    for tr, te in folds:
        a, b = _standardise(x[tr], x[te])
        p_ridge[te] = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(a, y[tr]).predict(b)
        p_knn[te] = KNeighborsRegressor(n_neighbors=min(knn, len(tr)), metric="cosine").fit(a, y[tr]).predict(b)
        p_mean[te] = y[tr].mean(0)
    return p_ridge, p_knn, p_mean


def fit_probes(features: dict[str, np.ndarray], data: ProbeSet, *, folds: int = 5, seed: int = 0,
               c: float = 0.1, knn: int = 10, holdout: np.ndarray | None = None) -> dict[str, float]:
    """Probe scores for every feature kind and every task the labels allow: patient-grouped out-of-fold
    (default), or, with `holdout` (a boolean mask of test rows, e.g. a split's test patients), fitted on the
    other rows and scored on those rows only."""
    from downstream.data import DIAGNOSIS_CLASSES
    from downstream.metrics import classification_metrics, multilabel_auroc

    def plan(rows: np.ndarray, strata: np.ndarray | None):
        """(folds in row-local indices, the local rows to score), or None if the task has too few patients."""
        if holdout is not None:
            test = holdout[rows]
            if not test.any() or test.all() or len(np.unique(data.groups[rows[~test]])) < 2:
                return None
            return [(np.flatnonzero(~test), np.flatnonzero(test))], np.flatnonzero(test)
        if len(np.unique(data.groups[rows])) < MIN_GROUPS:
            return None
        return _folds(data.groups[rows], strata, folds, seed), np.arange(len(rows))

    out: dict[str, float] = {}
    dx_rows = np.flatnonzero(data.diagnosis >= 0)
    fi_rows = np.flatnonzero(~np.isnan(data.findings[:, 0]))
    sev_rows = np.flatnonzero(~np.isnan(data.severity[:, 0]))
    dx = plan(dx_rows, data.diagnosis[dx_rows]) if len(np.unique(data.diagnosis[dx_rows])) >= 2 else None
    fi = plan(fi_rows, None) if len(fi_rows) else None
    sev = plan(sev_rows, None) if len(sev_rows) else None
    names = list(DIAGNOSIS_CLASSES)
    for kind in FEATURES:
        x = features[kind].astype(np.float64)
        pre = f"probe/{kind}/"
        if dx is not None:
            (fl, ev), y = dx, data.diagnosis[dx_rows]
            p_lr, p_knn = _classify(x[dx_rows], y, fl, c=c, knn=knn, n_classes=len(names))
            m_lr = classification_metrics(y[ev], p_lr[ev], names)
            m_knn = classification_metrics(y[ev], p_knn[ev], names)
            out |= {pre + "diagnosis_auroc": m_lr["macro_auroc"], pre + "diagnosis_bacc": m_lr["balanced_accuracy"],
                    pre + "diagnosis_knn_auroc": m_knn["macro_auroc"],
                    pre + "diagnosis_knn_bacc": m_knn["balanced_accuracy"]}
        if fi is not None:
            (fl, ev), y = fi, data.findings[fi_rows]
            usable = [j for j in range(y.shape[1]) if 3 <= y[ev, j].sum() <= len(ev) - 3]
            if usable:
                scores = np.zeros((len(y), len(usable)))
                for col, j in enumerate(usable):
                    p, _ = _classify(x[fi_rows], y[:, j].astype(int), fl, c=c, knn=knn, n_classes=2)
                    scores[:, col] = p[:, 1]
                out[pre + "findings_auroc"] = multilabel_auroc(y[np.ix_(ev, usable)], scores[ev],
                                                               [str(j) for j in usable])["mean_auroc"]
        if sev is not None:
            (fl, ev), y = sev, data.severity[sev_rows].astype(np.float64)
            p_ridge, p_knn, p_mean = _regress(x[sev_rows], y, fl, knn=knn)
            out |= {pre + "severity_mse": float(((p_ridge[ev] - y[ev]) ** 2).mean()),
                    pre + "severity_knn_mse": float(((p_knn[ev] - y[ev]) ** 2).mean()),
                    "probe/severity_mean_predictor_mse": float(((p_mean[ev] - y[ev]) ** 2).mean())}
    return out


def gain(name: str, value: float, reference: float) -> float:
    """How much better `value` is than `reference` (positive: better), whichever way the metric points."""
    return (reference - value) if name.endswith(LOWER_IS_BETTER) else (value - reference)


# ---------------------------------------------------------------------------------------- in training

class OnlineProbe:
    """Rank 0's probe set and schedule, the step-0 reference and the cost accounting (see the module doc)."""

    def __init__(self, spec, *, every: int, image_size: int, max_samples: int | None, folds: int,
                 seed: int, out_dir: str | Path):
        self.every, self.folds, self.seed = int(every), int(folds), int(seed)
        self.ref_path = Path(out_dir) / REFERENCE_FILE
        t0 = time.perf_counter()
        self.data = load_probe_set(spec, image_size=image_size, max_samples=max_samples, seed=seed)
        if len(np.unique(self.data.groups)) < MIN_GROUPS:
            raise UserError(f"--probe-shards {spec!r}: {self.data.describe()}; a probe needs labelled images "
                            f"of at least {MIN_GROUPS} patients")
        self.reference: dict[str, float] | None = None
        if self.ref_path.is_file():
            self.reference = json.loads(self.ref_path.read_text())["metrics"]
        self.seconds = time.perf_counter() - t0
        self.count = 0
        print(f"pretrain: probe set {self.data.describe()}; probes at step 0 and every {self.every} steps",
              flush=True)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def evaluate(self, encoder: torch.nn.Module, *, device, input_dtype, autocast_dtype) -> dict[str, float]:
        feats = encoder_features(encoder, self.data.images, device=device, input_dtype=input_dtype,
                                 autocast_dtype=autocast_dtype)
        return fit_probes(feats, self.data, folds=self.folds, seed=self.seed)

    def record(self, step: int, metrics: dict[str, float], seconds: float, train_seconds: float) -> dict:
        """The log row for one probe run: metrics, the reference beside them, the gains and the cost."""
        from runkit.atomic import atomic_write_json

        self.seconds += seconds
        self.count += 1
        if self.reference is None:
            if step != 0:
                raise RuntimeError("the random-init probe reference must be measured before a later probe")
            self.reference = dict(metrics)
            atomic_write_json(self.ref_path, {"step": 0, "what": "the random-init encoder (step 0)",
                                              "metrics": self.reference})
        row = dict(metrics)
        for k, v in metrics.items():
            ref = self.reference.get(k)
            if ref is None or not (math.isfinite(v) and math.isfinite(ref)):
                continue
            row["probe_ref/" + k[len("probe/"):]] = ref
            if step:
                row["probe_gain/" + k[len("probe/"):]] = gain(k, v, ref)
        row["probe/seconds"] = seconds
        if step and train_seconds > 0:  # probes so far (with loading the set) over training time so far
            row["probe/cost_fraction"] = self.seconds / train_seconds
        return row

    def summary_line(self, step: int, row: dict) -> str:
        keys = [k for k in ("probe/multiscale/diagnosis_auroc", "probe/multiscale/findings_auroc",
                            "probe/multiscale/severity_mse", "probe/pooled/diagnosis_auroc") if k in row]
        parts = []
        for k in keys:
            ref = row.get("probe_ref/" + k[len("probe/"):])
            name = k[len("probe/"):].replace("/", " ")
            parts.append(f"{name} {row[k]:.3f}" + (f" (random init {ref:.3f})" if ref is not None and step else ""))
        cost = f" | {row['probe/seconds']:.1f} s"
        if "probe/cost_fraction" in row:
            cost += f", probes so far {100 * row['probe/cost_fraction']:.1f} % of the training time"
        return f"probe step {step}: " + "; ".join(parts) + cost
