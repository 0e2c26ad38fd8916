"""REPORT.md for a demo folder: what a person wants to read after `make demo`.

It only reads what the stages wrote (metrics files and PNGs); it never recomputes a number, so the report
cannot disagree with the run folders it links to.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from runkit.atomic import atomic_write_text
from runkit.tracking import read_jsonl


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).resolve().relative_to(root.resolve()))


def _load(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def phantom_sheet(data: Path, out: Path, per_class: int = 4) -> Path | None:
    """A grid of phantom examples per diagnosis class, read back from the covid-chestxray folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    meta = data / "covid-chestxray" / "metadata.csv"
    if not meta.exists():
        return None
    groups: dict[str, list[str]] = {"COVID-19": [], "pneumonia": [], "No Finding": []}
    with open(meta, newline="") as f:
        for row in csv.DictReader(f):
            finding = row.get("finding", "")
            cls = "COVID-19" if "COVID-19" in finding else "No Finding" if finding == "No Finding" else "pneumonia"
            if len(groups[cls]) < per_class:
                groups[cls].append(row["filename"])
    fig, axes = plt.subplots(len(groups), per_class, figsize=(2.2 * per_class, 2.4 * len(groups)))
    for r, (cls, names) in enumerate(groups.items()):
        for c in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(names):
                ax.imshow(Image.open(data / "covid-chestxray" / "images" / names[c]).convert("L"), cmap="gray")
                ax.set_title(cls, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def loss_curve(rows: list[dict], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r and isinstance(r["loss"], float)]
    val = [(r["step"], r["val/ssim"]) for r in rows if "val/ssim" in r]
    baselines = {label: [(r["step"], r[key]) for r in rows if key in r]
                 for key, label in (("val/ssim_identity", "corrupted input (identity)"),
                                    ("val/ssim_blur", "blurred input"), ("val/ssim_mean_image", "mean training image"))}
    if not train:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(*zip(*train), label="train 1 - SSIM")
    ax[0].set_xlabel("step")
    ax[0].set_title("pretraining loss")
    ax[0].legend()
    if val:
        ax[1].plot(*zip(*val), "o-", label="restored")
    for (label, pts), style in zip(baselines.items(), ("s--", "^--", "v--")):
        if pts:
            ax[1].plot(*zip(*pts), style, label=label)
    ax[1].set_xlabel("step")
    ax[1].set_title("validation SSIM")
    if val or any(baselines.values()):
        ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


PROBE_PLOTS = (("multiscale/diagnosis_auroc", "diagnosis macro-AUROC (logistic)"),
               ("multiscale/diagnosis_knn_bacc", "diagnosis balanced acc. (kNN)"),
               ("multiscale/severity_mse", "severity MSE (ridge)"),
               ("pooled/diagnosis_auroc", "diagnosis macro-AUROC, pooled"))


def probe_curve(rows: list[dict], out: Path) -> Path | None:
    """Each online probe against its step-0 value (the random-init encoder), drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in PROBE_PLOTS if any(f"probe/{k}" in r for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (k, title) in zip(axes[0], panels):
        pts = [(r["step"], r[f"probe/{k}"]) for r in rows if f"probe/{k}" in r]
        ax.plot(*zip(*pts), "o-", label="pretrained")
        ref = next((r[f"probe_ref/{k}"] for r in rows if f"probe_ref/{k}" in r), None)
        if ref is not None:
            ax.axhline(ref, ls="--", color="gray", label="random init (step 0)")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def probe_checks(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The learning checks against the random-init encoder: the last probe against the step-0 one."""
    probes = [r for r in rows if any(k.startswith("probe/") and "/" in k[6:] for k in r)]
    if len(probes) < 2:
        return []
    last, checks = probes[-1], []
    for k, what in (("multiscale/diagnosis_auroc", "diagnosis macro-AUROC"), ("multiscale/severity_mse", "severity MSE")):
        if f"probe_gain/{k}" in last:
            g = last[f"probe_gain/{k}"]
            checks.append((f"online probe beats its random-init (step 0) value: {what}", g > 0,
                           (f"step {last['step']}: {last[f'probe/{k}']:.3f} vs {last[f'probe_ref/{k}']:.3f} "
                           f"(gain {g:+.3f})")))
    return checks


def _img(path: Path, root: Path, alt: str, width: int = 420) -> str:
    return f'<img src="{_rel(path, root)}" alt="{alt}" width="{width}">'


def write_report(out: Path, state: dict, *, preset: dict, device: str) -> Path:
    out = Path(out)
    figs = out / "report"
    figs.mkdir(exist_ok=True)
    lines = ["# Demo report", "",
             (f"Preset `{preset['name']}` on {device}. Every number below is read from the run folders "
              "beside this file; rerun with `make demo` (`make demo ARGS=--fresh` to start over)."), ""]
    checks = []

    lines += ["## Stage timing", "", "| stage | seconds |", "|---|---|"]
    total = 0.0
    for name, s in state.items():
        lines.append(f"| {name} | {s['seconds']:.1f} |")
        total += s["seconds"]
    lines += [f"| **total** | **{total:.1f}** |", ""]

    sheet = phantom_sheet(out / "data", figs / "phantoms.png")
    if sheet:
        lines += ["## Phantom examples", "", "covid-chestxray-format phantoms (COVID-19 / pneumonia / normal).", "",
                  _img(sheet, out, "phantoms", 560), ""]

    run = out / "pretrain"
    rows = read_jsonl(run / "metrics.jsonl")
    if rows:
        lines += ["## Pretraining (Models Genesis, 1 - SSIM)", ""]
        curve = loss_curve(rows, figs / "loss.png")
        if curve:
            lines += [_img(curve, out, "loss curve", 640), ""]
        vals = [r for r in rows if "val/ssim" in r]
        if vals:
            v = vals[-1]
            lines += [("| step | val images | SSIM restored | SSIM identity (corrupted input) | SSIM blurred input | "
                       "SSIM mean training image | PSNR restored | PSNR identity |"), "|---|---|---|---|---|---|---|---|",
                      (f"| {v['step']} | {v.get('val/count', '')} | {v['val/ssim']:.4f} | "
                       f"{v['val/ssim_identity']:.4f} | {v.get('val/ssim_blur', float('nan')):.4f} | "
                       f"{v.get('val/ssim_mean_image', float('nan')):.4f} | {v['val/psnr']:.2f} | "
                       f"{v['val/psnr_identity']:.2f} |"), ""]
            if "val/ssim_margin" in v:
                checks.append(("restoration SSIM above every trivial answer (identity, blur, mean image)",
                               v["val/ssim_margin"] > 0, f"margin {v['val/ssim_margin']:+.4f} at step {v['step']}"))
            collapsed = [r["step"] for r in vals if r.get("val/collapse_warning")]
            if collapsed:
                lines += [(f"**Collapse warning** at step {collapsed[0]}: the restorations stopped depending on "
                          "the input (see the run's log)."), ""]
        probe_png = probe_curve(rows, figs / "probes.png")
        if probe_png:
            lines += [("Online probes of the frozen encoder (patient-grouped CV on the probe shards), against the "
                      "same probes on the random-init encoder (step 0, dashed):"), "",
                      _img(probe_png, out, "probe curves", 760), ""]
            checks += probe_checks(rows)
        grids = sorted((run / "samples").glob("*.png"))
        if grids:
            lines += ["Reconstruction grid (original | corrupted | restored), last evaluation:", "",
                      _img(grids[-1], out, "reconstructions", 640), ""]

    diag = out / "diagnosis"
    dm = _load(diag / "metrics.json")
    if dm:
        lines += ["## Diagnosis: SSL-initialised against scratch", ""]
        table = diag / "compare_table.md"
        if table.exists():
            lines += [table.read_text().strip(), ""]
        summary = dm.get("summary", {})
        if "ssl" in summary and "scratch" in summary:
            a, b = (summary[n]["balanced_accuracy"]["mean"] for n in ("ssl", "scratch"))
            checks.append(("diagnosis fine-tuned from the SSL encoder beats the same from random init",
                           a > b, f"balanced accuracy {a:.3f} vs {b:.3f}"))
        for png in sorted(diag.glob("**/confusion*.png"))[:2]:
            lines += [_img(png, out, "confusion matrix", 320)]
        for init in sorted((diag / "scorecam").glob("*/")) if (diag / "scorecam").is_dir() else []:
            cams = sorted(init.glob("**/*.png"))[:6]
            if cams:
                lines += ["", (f"Score-CAM overlays, `{init.name}` model (deepest encoder stage at least 4 cells "
                               "wide; file names give the true class):"), "",
                          " ".join(_img(c, out, "score-cam", 200) for c in cams)]
        lines.append("")

    sev = out / "severity"
    sm = _load(sev / "metrics.json")
    if sm:
        lines += ["## Severity regression on the frozen pretrained DenseNet encoder", ""]
        table = sev / "severity_table.md"
        if table.exists():
            lines += [table.read_text().strip(), ""]
        lines += [" ".join(_img(p, out, "scatter", 320) for p in sorted(sev.glob("scatter_*.png"))), ""]

    sweep = out / "sweep"
    best = _load(sweep / "best.json")
    if best:
        lines += ["## Ray Tune sweep over the severity head", "",
                  "Best configuration (chosen on validation, evaluated once on test):", "", "```json",
                  json.dumps({k: best[k] for k in best if k in ("config", "val", "validation", "test", "trial_id")},
                             indent=1, default=str)[:2500], "```", ""]
        for png in sorted(sweep.glob("*.png")):
            lines += [_img(png, out, "sweep", 560), ""]

    if checks:
        lines += ["## Learning checks", "", "| check | holds | numbers |", "|---|---|---|"]
        lines += [f"| {name} | {'yes' if ok else '**no**'} | {nums} |" for name, ok, nums in checks]
        lines.append("")
    path = atomic_write_text(out / "REPORT.md", "\n".join(lines) + "\n")

    print("\nsummary")
    print(f"{'stage':<12}{'seconds':>10}")
    for name, s in state.items():
        print(f"{name:<12}{s['seconds']:>10.1f}")
    for name, ok, nums in checks:
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {nums}")
    return path
