"""The seeds' protocols as one job each (`launch/downstream.py severity-protocol | compare` with the configs
launch/configs/protocol_seed000.yaml and protocol_seed004.yaml).

Seed 000 (`run_severity_protocol`): a backbone with named outputs (xrv:FILE, chexnet:FILE, nih14:DIR),
features = its raw logits, computed once for the image and its flips; then all outputs, 4 outputs, one
output (Lung Opacity), and that one output + H-flip, + V-flip, + H/V-flip (flipped training copies).
Every variant is scored on the same patient-grouped splits of two schemes, 8:2 (seed 000) and Cohen's
50/50 x 50, beside the mean predictor: one table of MSE per target.

Seed 004 is `compare` with classes balanced to N images per class and the patient-grouped 64/16/20 split
(downstream.streaming.prepare_sets picks the images on the shard index, so no unused image is decoded).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from downstream.config import SeverityProtocolConfig
from downstream.metrics import fmt_mean_sd
from runkit.errors import UserError

# Seed 000's reported test MSE (8:2 split; geographic, opacity), for the table's reference rows.
SEED000_PAPER = {
    "Cohen et al. baseline": (2.060, 0.861), "18 outputs": (2.907, 1.146), "4 outputs": (2.474, 1.125),
    "Lung Opacity": (1.455, 0.961), "+ H-flip": (1.412, 0.954), "+ V-flip": (1.518, 0.933),
    "+ H/V-flip": (1.409, 0.844),
}


def variants(cfg: dict, n_outputs: int) -> list[tuple[str, str | None, str]]:
    """(label, columns, flip) in the seed's order."""
    single = cfg["single"]
    return [(f"all {n_outputs} outputs", None, "none"), (f"{len(cfg['four'])} outputs", ",".join(cfg["four"]), "none"),
            (single, single, "none"), (f"{single} + H-flip", single, "h"), (f"{single} + V-flip", single, "v"),
            (f"{single} + H/V-flip", single, "hv")]


def run_severity_protocol(config, *, data=None, backbone=None, log=print) -> dict:
    """Seed 000's table; returns {"schemes", "variants", "rows", "baseline", "n", ...}."""
    from downstream.backbones import load_backbone, select_pathologies
    from downstream.device import parse_device
    from downstream.severity import (
        FLIPS,
        extract_features,
        fit_severity_head,
        load_severity_data,
        repeated_splits,
    )

    cfg = (config if isinstance(config, SeverityProtocolConfig)
           else SeverityProtocolConfig.from_dict(config, "severity-protocol config")).to_dict()
    device = parse_device(cfg["device"])
    if backbone is None:
        import torch

        torch.manual_seed(int(cfg["seed"]))
        backbone = load_backbone(cfg["backbone"], image_size=cfg["image_size"])
    if backbone.pathology_names is None:
        raise UserError(f"the seed 000 protocol needs a backbone with named outputs (xrv:FILE, chexnet:FILE or "
                        f"nih14:DIR); {cfg['backbone']} has none")
    names = tuple(backbone.pathology_names)
    select_pathologies(names, cfg["four"])  # a missing name is a UserError before any image is read
    select_pathologies(names, cfg["single"])
    if data is None:
        if not cfg["shards"]:
            raise UserError("severity-protocol needs --shards with severity-scored images")
        data = load_severity_data(cfg["shards"], int(cfg["image_size"] or backbone.image_size))
    feats = extract_features(backbone, data.images, "pathologies", flips=FLIPS, batch_size=int(cfg["batch_size"]),
                             progress=bool(cfg["progress"]), device=device)
    groups = data.groups
    schemes = {
        f"8:2 x {cfg['holdout_repeats']}": repeated_splits(groups, cfg["holdout_repeats"], cfg["holdout_test_size"],
                                                           cfg["seed"]),
        f"50/50 x {cfg['cohen_repeats']}": repeated_splits(groups, cfg["cohen_repeats"], 0.5, cfg["seed"]),
    }
    head = {"regressor": cfg["regressor"], "alpha": cfg["alpha"], "inner_folds": cfg["inner_folds"],
            "tta": cfg["tta"], "targets": cfg["targets"], "seed": cfg["seed"]}
    rows, baseline = [], {}
    for label, columns, flip in variants(cfg, len(names)):
        row = {"variant": label, "columns": columns, "flip": flip, "schemes": {}}
        for scheme, splits in schemes.items():
            res = fit_severity_head(feats, data.targets, {**head, "flip": flip, "columns": columns},
                                    groups=groups, splits=splits)
            row["schemes"][scheme] = {t: r["model"]["mse"] for t, r in res["targets"].items()}
            baseline.setdefault(scheme, {t: r["baseline"]["mse"] for t, r in res["targets"].items()})
        rows.append(row)
        if log is not None:
            log("  " + label + ": " + "; ".join(
                f"{sc} " + ", ".join(f"{t} {v['mean']:.3f}" for t, v in m.items()) for sc, m in row["schemes"].items()))
    return {"task": "severity-protocol", "backbone": cfg["backbone"], "device": str(device), "n": len(data),
            "patients": len(np.unique(groups)), "outputs": list(names), "schemes": list(schemes),
            "targets": cfg["targets"], "regressor": cfg["regressor"], "rows": rows, "baseline": baseline,
            "config": {**cfg, "device": str(device)}}


def severity_protocol_table(result: dict) -> str:
    """Markdown: one row per variant (and the mean predictor), MSE mean ± sd per scheme x target."""
    cols = [(sc, t) for sc in result["schemes"] for t in result["targets"]]
    short = {"geographic_mean": "geographic", "opacity_mean": "opacity"}
    lines = ["| features | " + " | ".join(f"{short.get(t, t)} MSE ({sc})" for sc, t in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | " + " | ".join(fmt_mean_sd(row["schemes"][sc][t]) for sc, t in cols) + " |")
    lines.append("| mean predictor | " + " | ".join(fmt_mean_sd(result["baseline"][sc][t]) for sc, t in cols) + " |")
    summary = (f"{result['n']} scored images of {result['patients']} patients; regressor {result['regressor']}; "
               "every split is patient-grouped and shared by all rows.")
    lines += ["", summary, "",
              "Seed 000 reported (8:2, test MSE geographic / opacity): "
              + "; ".join(f"{k} {g:.3f} / {o:.3f}" for k, (g, o) in SEED000_PAPER.items()) + "."]
    return "\n".join(lines)


def write_severity_protocol(result: dict, out_dir: str | Path, tracker=None) -> dict:
    from runkit.atomic import atomic_write_json, atomic_write_text
    from runkit.jsonsafe import to_jsonable

    out = Path(out_dir)
    files = {"table": str(atomic_write_text(out / "severity_protocol.md", severity_protocol_table(result) + "\n"))}
    atomic_write_json(out / "metrics.json", to_jsonable({**result, "files": files}))
    if tracker is not None:
        for row in result["rows"]:
            for sc, m in row["schemes"].items():
                tracker.summary({f"{row['variant']}/{sc}/{t}_mse": v["mean"] for t, v in m.items()})
    return files
