"""After a sweep: one row per trial (results.csv), the best configuration on validation evaluated once on
test (best.json), a figure of every trial's metric curve (trials.png), and a W&B summary run.

Selection: diagnosis trials score the best validation macro-F1 over their epochs (training restores the
best epoch's weights); severity trials score their cross-validated MSE, and only trials that finished every
fold are eligible (a partial CV mean over one lucky fold must not win). Errored trials never win.

Pure reporting: this module reads Tune's experiment folder and writes files; it imports neither the
driver (downstream.sweep) nor the trials (downstream.trials). The driver passes in the evaluation of the
best configuration on test as a function.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runkit.errors import UserError
from runkit.jsonsafe import to_jsonable


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def collect_trials(experiment_path: str, metric: str, mode: str) -> list[dict]:
    """Rows in trial-creation order: id, status, config, metric curve, score, iterations, error."""
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(experiment_path, default_metric=metric, default_mode=mode)
    frames = ea.trial_dataframes
    rows = []
    for i, trial in enumerate(sorted(ea.trials, key=lambda t: t.trial_id)):
        df = _last_attempt(frames.get(trial.trial_id))
        curve = [float(v) for v in df[metric].tolist()] if df is not None and metric in df else []
        complete = bool(df is not None and "complete" in df and len(df) and float(df["complete"].iloc[-1]) >= 1)
        finite = [v for v in curve if math.isfinite(v)]
        if mode == "max":
            score = max(finite) if finite else float("nan")
        else:
            score = curve[-1] if curve else float("nan")
        status = str(trial.status)
        err = ""
        if status == "ERROR":
            err = _error_line(trial)
        rows.append({"trial_index": i, "trial_id": trial.trial_id, "status": status,
                     "stopped_early": status != "ERROR" and not complete and bool(curve),
                     "complete": complete, "iterations": len(curve), "metric": metric, "score": score,
                     "last": curve[-1] if curve else float("nan"), "curve": curve,
                     "config": dict(trial.config), "error": err})
    return rows


def _last_attempt(df):
    """Rows of the trial's last attempt: a retried or resumed trial without a checkpoint starts over at
    training_iteration 1, and progress.csv keeps the earlier attempt's rows above it."""
    if df is None or "training_iteration" not in df or not len(df):
        return df
    it = df["training_iteration"].to_numpy()
    starts = [i for i in range(len(it)) if i == 0 or it[i] <= it[i - 1]]
    return df.iloc[starts[-1]:]


def _error_line(trial) -> str:
    try:
        text = Path(trial.error_file).read_text() if getattr(trial, "error_file", None) else ""
    except OSError:
        text = ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "error")[:300]


def pick_best(rows: list[dict], task: str, mode: str) -> dict:
    ok = [r for r in rows if r["status"] != "ERROR" and _finite(r["score"]) and (task != "severity" or r["complete"])]
    if not ok:
        raise UserError("no trial finished with a usable validation metric; see results.csv for the errors")
    key = (lambda r: r["score"]) if mode == "max" else (lambda r: -r["score"])
    return max(ok, key=lambda r: (key(r), -r["trial_index"]))


def write_csv(rows: list[dict], path: Path) -> Path:
    from runkit.atomic import atomic_write_text

    keys = sorted({k for r in rows for k in r["config"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_index", "trial_id", "status", "stopped_early", "iterations", rows[0]["metric"] if rows else
                "metric", "last", *[f"config/{k}" for k in keys], "error"])
    for r in rows:
        w.writerow([r["trial_index"], r["trial_id"], r["status"], r["stopped_early"], r["iterations"],
                    _fmt(r["score"]), _fmt(r["last"]), *[_fmt(r["config"].get(k, "")) for k in keys], r["error"]])
    return atomic_write_text(path, buf.getvalue())


def _fmt(v):
    if isinstance(v, float):
        return "" if not math.isfinite(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return v


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_trials(rows: list[dict], metric: str, mode: str, best_id: str | None, path: Path) -> Path:
    """Left: each trial's per-iteration curve drawn at x = trial index (short curves = ASHA stops, x = errors).
    Right: the same curves against epoch/fold."""
    from runkit.figures import pyplot, save_png

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    longest = max([len(r["curve"]) for r in rows] + [1])
    for r in rows:
        i, c = r["trial_index"], r["curve"]
        color = "C3" if r["status"] == "ERROR" else ("C2" if r["trial_id"] == best_id else "C0")
        if c:
            xs = i + 0.8 * np.arange(len(c)) / max(1, longest - 1)
            ax.plot(xs, c, "-", color=color, lw=1.5, alpha=0.9)
            ax.plot(xs[-1], c[-1], "o", color=color, ms=4)
            ax2.plot(np.arange(1, len(c) + 1), c, "-o", color=color, ms=3, lw=1, alpha=0.7)
        if r["status"] == "ERROR":
            ax.plot(i, c[-1] if c else np.nanmean([v for q in rows for v in q["curve"]] or [0]), "x", color="C3",
                    ms=8)
    ax.set_xlabel("trial index (each curve: one trial's epochs/folds; short = stopped early, x = error)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial ({'higher' if mode == 'max' else 'lower'} is better; green = best)")
    ax2.set_xlabel("training iteration (epoch / fold)")
    ax2.set_ylabel(metric)
    ax2.set_title("curves (ASHA stops end early)")
    return save_png(fig, path)


def finalize(settings, experiment_path: str, metric: str, mode: str, *,
             evaluate: Callable[[dict], dict] | None = None, wandb_mode: str = "disabled",
             extra: dict | None = None) -> dict:
    """results.csv, trials.png, best.json (with `evaluate(best_config)` merged in) and a W&B summary run.

    `settings` is the sweep's SweepConfig; `extra` is recorded in best.json (e.g. what the driver left out
    of the space)."""
    from runkit.atomic import atomic_write_json
    from runkit.tracking import Tracker

    out = Path(settings.out)
    rows = collect_trials(experiment_path, metric, mode)
    files = {"results": str(write_csv(rows, out / "results.csv"))}
    best = pick_best(rows, settings.task, mode)
    files["plot"] = str(plot_trials(rows, metric, mode, best["trial_id"], out / "trials.png"))
    summary = {"sweep": settings.name, "task": settings.task, "trial_id": best["trial_id"],
               "trial_index": best["trial_index"], "metric": metric, "mode": mode, "config": best["config"],
               "validation": {metric: best["score"], "iterations": best["iterations"]},
               "selection": ("max validation macro-F1 over epochs" if mode == "max"
                             else "cross-validated MSE on train+val, trials that finished every fold"),
               "trials": {"total": len(rows), "errored": sum(r["status"] == "ERROR" for r in rows),
                          "stopped_early": sum(bool(r["stopped_early"]) for r in rows)},
               "backbone": settings.backbone, "experiment_path": experiment_path, **(extra or {})}
    if evaluate is not None:
        ev = evaluate(best["config"])
        summary["test"] = ev.pop("test")
        if "validation" in ev:
            summary["validation"]["refit"] = ev.pop("validation")
        summary.update(ev)
    files["best"] = str(atomic_write_json(out / "best.json", to_jsonable(summary)))
    tracker = Tracker(out, best["config"], project=settings.wandb_project, group=settings.name,
                      name=f"{settings.name}-best", job_type="sweep-best", mode=wandb_mode,
                      jsonl_name="best_metrics.jsonl")
    try:
        flat = {f"val/{metric}": best["score"], "best_trial_id": best["trial_id"]}
        test = summary.get("test") or {}
        flat.update({f"test/{k}": v for k, v in test.items() if _finite(v)})
        tracker.log(flat)
        tracker.summary(flat)
        tracker.log_image("trials", files["plot"])
    finally:
        tracker.finish()
    return {"experiment_path": experiment_path, "rows": rows, "best": summary, "files": files}
