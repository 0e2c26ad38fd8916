"""The NIH-14 pathology head (the CheXNet recipe): multi-label fine-tuning with BCE, AUROC per finding.

The trained encoder + 14-way linear layer is saved as DIR/nih14.pt + nih14.json, and `nih14:DIR` loads it
as a backbone whose named outputs (e.g. consolidation,infiltration,pneumonia,edema) are severity features.
That is how seed 000's best features come from our own pretrained encoder rather than a downloaded one.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from downstream.backbones import Backbone, SmpBody, load_backbone, save_nih14
from downstream.config import NIH14Config
from downstream.data import ImageSet, ShardIndex, findings_target, split_indices
from downstream.device import parse_device
from downstream.finetune import Classifier, fit, predict_with_targets, resolve
from downstream.metrics import multilabel_auroc
from downstream.streaming import prepare_sets, split_sets
from runkit.errors import UserError
from runkit.jsonsafe import to_jsonable
from shards.record import NIH_FINDINGS


def evaluate_probs(probs: np.ndarray, targets: np.ndarray) -> dict:
    return multilabel_auroc(targets, probs, NIH_FINDINGS)


def train_nih14(config, *, data: ImageSet | ShardIndex | None = None, splits: dict | None = None,
                backbone: Backbone | None = None, report: Callable[[dict], object] | None = None,
                log: Callable[[dict, int], None] | None = None) -> dict:
    """Fine-tune the 14-finding head. By default (`stream: on`) the shards are indexed (JSON only), split
    by patient, and every epoch streams the training split; validation and test stream too, so memory
    does not grow with the number of images."""
    cfg = resolve(config, NIH14Config)
    device = parse_device(cfg["device"])
    torch.manual_seed(int(cfg["seed"]))
    if backbone is None:
        backbone = load_backbone(cfg["backbone"], image_size=cfg["image_size"])
    if not isinstance(backbone.body, SmpBody):
        raise UserError("nih14 fine-tunes our own encoders (RUN/encoder.pt or scratch); xrv/chexnet already "
                        "have pathology outputs")
    image_size = int(cfg["image_size"] or backbone.image_size)
    backbone.image_size = image_size
    if data is None:
        if not cfg["shards"]:
            raise UserError("nih14 needs --shards with NIH images")
        data, found = prepare_sets(cfg, findings_target, image_size, "nih14 shards")
        splits = splits or found
    if splits is None:
        splits = split_indices(data, seed=int(cfg["split_seed"]), resplit=bool(cfg["resplit"]))
    for name in ("train", "val", "test"):
        if len(splits[name]) == 0:
            raise UserError(f"the nih14 {name} split is empty; use more images or --resplit")
    model = Classifier(backbone, len(NIH_FINDINGS), head="linear", dropout=float(cfg["dropout"]))
    train, val, test = split_sets(data, splits, findings_target, image_size, cfg)
    out = fit(model, train, val, cfg, multiclass=False, evaluate=evaluate_probs, monitor="mean_auroc",
              report=report, log=log, device=device)
    logits, _ = predict_with_targets(model, test, int(cfg["eval_batch_size"]))
    probs = logits.sigmoid().numpy()
    model.cpu()
    backbone.classifier = model.head[-1]
    backbone.pathology_names = tuple(NIH_FINDINGS)
    return {"config": {**cfg, "device": str(device)}, "streamed": isinstance(data, ShardIndex), "val": out["best"], "best_epoch": out["best_epoch"],
            "test": evaluate_probs(probs, test.targets), "history": out["history"], "backbone": backbone,
            "counts": {s: len(splits[s]) for s in splits}}


def write_outputs(result: dict, out_dir: str | Path, tracker=None) -> dict:
    from downstream import plots
    from runkit.atomic import atomic_write_json

    out = Path(out_dir)
    weights = save_nih14(result["backbone"], out, {"base_backbone": result["config"]["backbone"],
                                                   "test_mean_auroc": result["test"]["mean_auroc"]})
    files = {"weights": str(weights), "backbone_spec": f"nih14:{out}",
             "curves": str(plots.curve_png(result["history"], ["train_loss", "val_mean_auroc"], out / "curves.png",
                                           "NIH-14 training"))}
    metrics = {"task": "nih14", "findings": list(NIH_FINDINGS), "backbone": result["config"]["backbone"],
               "device": result["config"]["device"], "streamed": result["streamed"],
               "counts": result["counts"], "best_epoch": result["best_epoch"], "val": result["val"],
               "test": result["test"], "history": result["history"], "files": files}
    atomic_write_json(out / "metrics.json", to_jsonable(metrics))
    if tracker is not None:
        tracker.summary({"test/mean_auroc": result["test"]["mean_auroc"]})
    return files
