"""PNG figures of the downstream jobs (matplotlib Agg, written atomically)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runkit.figures import pyplot as _figure
from runkit.figures import save_png


def _save(fig, path) -> Path:
    return save_png(fig, path)


def confusion_png(cm, class_names: Sequence[str], path, title: str = "confusion matrix (test)") -> Path:
    plt = _figure()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def scatter_png(true, pred, path, *, label: str, lim: float, title: str = "") -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(true, pred, s=14, alpha=0.7)
    ax.plot([0, lim], [0, lim], "k--", lw=1)
    ax.set_xlim(-0.2, lim + 0.2)
    ax.set_ylim(-0.2, lim + 0.2)
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(title or label)
    return _save(fig, path)


def overlay_png(image, cam, path, title: str = "") -> Path:
    """Gray image with the Score-CAM map (jet, alpha 0.45) on top, plus the image alone for comparison."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    for ax in axes:
        ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    axes[1].imshow(np.asarray(cam), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def curve_png(rows: list[dict], keys: Sequence[str], path, title: str = "") -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k in keys:
        xs = [r["epoch"] for r in rows if k in r]
        ax.plot(xs, [r[k] for r in rows if k in r], marker="o", ms=3, label=k)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)
