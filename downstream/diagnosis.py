"""3-class diagnosis (COVID-19 / pneumonia / normal, seed 004) on any backbone.

`train_diagnosis(config, ...)` is the library entry point (Ray Tune calls it with a per-epoch `report`);
`write_outputs` turns its result into DIR/metrics.json, the confusion-matrix PNG and Score-CAM overlays.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from downstream.backbones import Backbone, load_backbone
from downstream.config import DiagnosisConfig
from downstream.data import (
    DIAGNOSIS_CLASSES,
    ImageSet,
    ShardIndex,
    diagnosis_target,
    load_shards,
    split_indices,
)
from downstream.device import parse_device
from downstream.finetune import Classifier, fit, predict_with_targets, resolve
from downstream.metrics import classification_metrics
from downstream.streaming import prepare_sets, split_sets
from runkit.errors import UserError
from runkit.jsonsafe import to_jsonable


def evaluate_probs(probs: np.ndarray, targets: np.ndarray) -> dict:
    return classification_metrics(targets, probs, DIAGNOSIS_CLASSES)


def load_diagnosis_data(shards, image_size: int, **kw) -> ImageSet:
    return load_shards(shards, diagnosis_target, image_size=image_size, desc="diagnosis shards", **kw)


def check_classes(data: ImageSet | ShardIndex, splits: dict) -> None:
    train = data.targets[splits["train"]]
    missing = [c for i, c in enumerate(DIAGNOSIS_CLASSES) if not (train == i).any()]
    if missing:
        raise UserError(f"the training split has no {', '.join(missing)} images; add shards with those classes")
    for s in ("val", "test"):
        if len(splits[s]) == 0:
            raise UserError(f"the {s} split is empty; use more data or resplit")


def train_diagnosis(config, *, data: ImageSet | ShardIndex | None = None, splits: dict | None = None,
                    backbone: Backbone | None = None, report: Callable[[dict], object] | None = None,
                    log: Callable[[dict, int], None] | None = None) -> dict:
    """Fine-tune a diagnosis head; returns config, val (best epoch), test metrics, history, model, test probs.

    `config` is a `DiagnosisConfig` or a mapping of its keys. `report(row)` gets {'epoch', 'train_loss',
    'val_macro_f1', 'val_accuracy', ...} after each epoch. `data`/`splits`/`backbone` may be passed in so
    that sweeps and seed comparisons load them once; `data` may be an `ImageSet` or a `ShardIndex`
    (streamed). Runs on `config.device` (auto: the GPU when there is one).
    """
    cfg = resolve(config, DiagnosisConfig)
    device = parse_device(cfg["device"])
    torch.manual_seed(int(cfg["seed"]))  # the head (and a scratch backbone) initialise from the run's seed
    if backbone is None:
        backbone = load_backbone(cfg["backbone"], image_size=cfg["image_size"])
    image_size = int(cfg["image_size"] or backbone.image_size)
    if data is None:
        if not cfg["shards"]:
            raise UserError("diagnosis needs --shards")
        data, found = prepare_sets(cfg, diagnosis_target, image_size, "diagnosis shards")
        splits = splits or found
    if splits is None:
        splits = split_indices(data, seed=int(cfg["split_seed"]), resplit=bool(cfg["resplit"]))
    check_classes(data, splits)
    model = Classifier(backbone, len(DIAGNOSIS_CLASSES), head=cfg["head"], dropout=float(cfg["dropout"]),
                       hidden=int(cfg["hidden"]))
    train, val, test = split_sets(data, splits, diagnosis_target, image_size, cfg)
    out = fit(model, train, val, cfg, multiclass=True, evaluate=evaluate_probs, monitor="macro_f1",
              report=report, log=log, device=device)
    logits, _ = predict_with_targets(model, test, int(cfg["eval_batch_size"]))
    probs = logits.softmax(1).numpy()
    return {"config": {**cfg, "image_size": image_size, "device": str(device), "balance_used": out["balance"]},
            "val": out["best"], "best_epoch": out["best_epoch"],
            "test": evaluate_probs(probs, test.targets), "history": out["history"], "model": model,
            "test_probs": probs, "test_index": np.asarray(splits["test"]), "data": data, "splits": splits,
            "streamed": isinstance(data, ShardIndex),
            "counts": {s: np.bincount(data.targets[splits[s]], minlength=3).tolist() for s in splits}}


def _pick_images(data: ImageSet | ShardIndex, pick: np.ndarray, image_size: int) -> torch.Tensor:
    """Float images of `pick`; a streamed set loads just those few from the shards."""
    if isinstance(data, ImageSet):
        return data.float_images(pick)
    keys = data.keys[pick]
    few = load_shards(data.urls, diagnosis_target, image_size=image_size, keys=keys, desc="Score-CAM images")
    where = {r["key"]: i for i, r in enumerate(few.records)}
    return few.float_images([where[k] for k in keys])


def scorecam_overlays(result: dict, data: ImageSet, out_dir: str | Path, per_class: int,
                      max_channels: int | None = 256) -> list[str]:
    """Score-CAM overlays of the first `per_class` test images of each true class: OUT/<class>_<key>.png."""
    from downstream import plots
    from downstream.scorecam import score_cam

    if per_class <= 0:
        return []
    test_idx = np.asarray(result["test_index"])
    y = data.targets[test_idx]
    pick = np.concatenate([test_idx[y == c][:per_class] for c in range(len(DIAGNOSIS_CLASSES))]).astype(int)
    if not len(pick):
        return []
    images = _pick_images(data, pick, int(result["config"]["image_size"]))
    maps, classes = score_cam(result["model"], images, max_channels=max_channels)
    cams = []
    for j, i in enumerate(pick):
        true = DIAGNOSIS_CLASSES[int(data.targets[i])]
        pred = DIAGNOSIS_CLASSES[int(classes[j])]
        key = data.records[i]["key"] if data.records else str(i)
        cams.append(str(plots.overlay_png(images[j, 0], maps[j], Path(out_dir) / f"{true}_{key}.png",
                                          f"{key}: true {true}, Score-CAM for predicted {pred}")))
    return cams


def write_outputs(result: dict, data: ImageSet | ShardIndex, out_dir: str | Path, tracker=None) -> dict:
    """metrics.json, confusion.png, curves.png and scorecam/<class>_<i>.png; returns what went where."""
    from downstream import plots
    from runkit.atomic import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    files = {"confusion": str(plots.confusion_png(result["test"]["confusion"], DIAGNOSIS_CLASSES,
                                                  out / "confusion.png")),
             "curves": str(plots.curve_png(result["history"], ["train_loss", "val_macro_f1", "val_accuracy"],
                                           out / "curves.png", "diagnosis training"))}
    cams = scorecam_overlays(result, data, out / "scorecam", int(cfg.get("scorecam_per_class") or 0),
                             cfg.get("scorecam_max_channels") or None)
    files["scorecam"] = cams
    metrics = {"task": "diagnosis", "classes": list(DIAGNOSIS_CLASSES), "backbone": cfg["backbone"],
               "device": cfg.get("device"), "streamed": result.get("streamed", False), "counts": result["counts"], "best_epoch": result["best_epoch"], "val": result["val"],
               "test": result["test"], "history": result["history"], "files": files}
    atomic_write_json(out / "metrics.json", to_jsonable(metrics))
    if tracker is not None:
        t = result["test"]
        tracker.summary({f"test/{k}": t[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "macro_auroc")})
        tracker.log_image("confusion", files["confusion"])
    return files

