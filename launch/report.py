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
    base = [(r["step"], r["val/ssim_identity"]) for r in rows if "val/ssim_identity" in r]
    if not train:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(*zip(*train), label="train 1 - SSIM")
    ax[0].set_xlabel("step")
    ax[0].set_title("pretraining loss")
    ax[0].legend()
    if val:
        ax[1].plot(*zip(*val), "o-", label="restored")
    if base:
        ax[1].plot(*zip(*base), "s--", label="corrupted input (identity)")
    ax[1].set_xlabel("step")
    ax[1].set_title("validation SSIM")
    if val or base:
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


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
            lines += [("| step | val images | SSIM restored | SSIM of corrupted input (identity) | PSNR restored | "
                       "PSNR of corrupted input |"), "|---|---|---|---|---|---|",
                      (f"| {v['step']} | {v.get('val/count', '')} | {v['val/ssim']:.4f} | "
                       f"{v['val/ssim_identity']:.4f} | {v['val/psnr']:.2f} | {v['val/psnr_identity']:.2f} |"), ""]
            checks.append(("restoration SSIM above the identity baseline", v["val/ssim"] > v["val/ssim_identity"],
                           f"{v['val/ssim']:.4f} vs {v['val/ssim_identity']:.4f}"))
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
        if summary:
            best = max(summary, key=lambda k: summary[k]["accuracy"]["mean"])
            acc = summary[best]["accuracy"]["mean"]
            checks.append(("diagnosis accuracy well above chance (1/3)", acc > 0.5, f"{best}: {acc:.3f}"))
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
        for t, r in (sm.get("result", sm).get("targets") or {}).items():
            m, b = r["model"]["mse"]["mean"], r["baseline"]["mse"]["mean"]
            checks.append((f"severity MSE below the mean predictor ({t})", m < b, f"{m:.3f} vs {b:.3f}"))
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
