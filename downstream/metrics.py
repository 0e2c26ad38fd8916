"""Metric definitions in one place, so diagnosis, severity, NIH-14, compare and Tune report the same numbers."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def classification_metrics(y_true, prob, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class sensitivity/specificity, one-vs-rest AUROC, confusion.

    `prob` is [N, K] class probabilities. AUROC of a class absent (or alone) in y_true is NaN, and the
    macro AUROC averages the defined ones.
    """
    from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

    y = np.asarray(y_true, dtype=int)
    prob = np.asarray(prob, dtype=float)
    k = len(class_names)
    pred = prob.argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    out = {"n": len(y), "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
           "macro_f1": float(f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0))}
    sens, per_class = [], {}
    for c, name in enumerate(class_names):
        tp, fn = cm[c, c], cm[c].sum() - cm[c, c]
        fp = cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        se = tp / (tp + fn) if tp + fn else float("nan")
        sp = tn / (tn + fp) if tn + fp else float("nan")
        pos = (y == c).astype(int)
        auc = float(roc_auc_score(pos, prob[:, c])) if 0 < pos.sum() < len(pos) else float("nan")
        per_class[name] = {"sensitivity": float(se), "specificity": float(sp), "auroc": auc, "support": int(pos.sum())}
        if not math.isnan(se):
            sens.append(se)
    aucs = [v["auroc"] for v in per_class.values() if not math.isnan(v["auroc"])]
    out["balanced_accuracy"] = float(np.mean(sens)) if sens else float("nan")
    out["macro_auroc"] = float(np.mean(aucs)) if aucs else float("nan")
    out["per_class"] = per_class
    out["confusion"] = cm.tolist()
    return out


def multilabel_auroc(y_true, scores, names: Sequence[str]) -> dict:
    """Per-finding AUROC (NaN where a finding has only one class in y_true) and their mean."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true)
    s = np.asarray(scores)
    per = {}
    for j, name in enumerate(names):
        col = y[:, j]
        per[name] = float(roc_auc_score(col, s[:, j])) if 0 < col.sum() < len(col) else float("nan")
    defined = [v for v in per.values() if not math.isnan(v)]
    return {"mean_auroc": float(np.mean(defined)) if defined else float("nan"), "auroc": per}


def regression_metrics(y_true, y_pred) -> dict:
    """MSE, MAE, Pearson r (NaN for a constant prediction) and R²."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    err = p - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r = float(np.corrcoef(y, p)[0, 1]) if np.ptp(p) > 0 and np.ptp(y) > 0 else float("nan")
    return {"mse": float((err ** 2).mean()), "mae": float(np.abs(err).mean()), "pearson_r": r,
            "r2": 1.0 - float((err ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")}


def mean_sd(values) -> dict:
    """{'mean', 'sd', 'n'} over finite values (sample sd, ddof=1; 0 for a single value)."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if v.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def fmt_mean_sd(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"


def to_jsonable(obj):
    """numpy scalars -> Python, NaN -> None (strict JSON), recursively (runkit.jsonsafe, the one sanitiser)."""
    from runkit.jsonsafe import to_jsonable as sanitise

    return sanitise(obj)
