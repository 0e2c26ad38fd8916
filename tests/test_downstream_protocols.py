"""The seeds' protocols, one command each from launch/configs/, in CI-sized form on phantoms.

Seed 000 runs on an xrv-format DenseNet-121 state dict with random weights (the real file is a download
we cannot make here), seed 004 on an exported (untrained) Genesis encoder against scratch; both check the
protocol's bookkeeping and its table, not learning (tests/test_severity.py and test_diagnosis.py do that).
"""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_downstream import SIZE, nih_shards, phantom_shards

from downstream.data import DIAGNOSIS_CLASSES

REPO = Path(__file__).resolve().parents[1]


def _main():
    return runpy.run_path(str(REPO / "launch" / "downstream.py"), run_name="protocols")["main"]


@pytest.mark.slow
def test_seed000_severity_protocol_writes_its_table(tmp_path_factory, tmp_path):
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    m = torchvision.models.densenet121(weights=None, num_classes=18)
    m.features.conv0 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(m.state_dict(), tmp_path / "xrv.pt")
    out = tmp_path / "p000"
    rc = _main()(["severity-protocol", "--config", str(REPO / "launch/configs/protocol_seed000.yaml"),
                  "--shards", str(phantom_shards(tmp_path_factory)[1]), "--backbone", f"xrv:{tmp_path / 'xrv.pt'}",
                  "--image-size", "32", "--holdout-repeats", "4", "--cohen-repeats", "4", "--device", "cpu",
                  "--out", str(out), "--wandb", "disabled", "--no-progress"])
    assert rc == 0
    table = (out / "severity_protocol.md").read_text().splitlines()
    rows = [ln for ln in table if ln.startswith("| ") and not ln.startswith("| features")]
    labels = [r.split(" | ")[0][2:] for r in rows]
    assert labels == ["all 18 outputs", "4 outputs", "lung_opacity", "lung_opacity + H-flip", "lung_opacity + V-flip",
                      "lung_opacity + H/V-flip", "mean predictor"]
    assert "8:2 x 4" in table[0] and "50/50 x 4" in table[0] and table[0].count("MSE") == 4
    m = json.loads((out / "metrics.json").read_text())
    assert m["schemes"] == ["8:2 x 4", "50/50 x 4"] and len(m["rows"]) == 6 and m["regressor"] == "linear"
    for row in m["rows"]:
        for scheme in m["schemes"]:
            for t in ("geographic_mean", "opacity_mean"):
                assert row["schemes"][scheme][t]["n"] == 4 and row["schemes"][scheme][t]["mean"] >= 0
    # every row is scored on the same splits: the mean predictor's MSE is one number per scheme and target
    assert set(m["baseline"]) == set(m["schemes"])


@pytest.mark.slow
def test_seed004_diagnosis_protocol_balances_splits_and_compares(tmp_path_factory, tmp_path):
    from pretrain.model import build_unet, export_encoder

    torch.manual_seed(0)
    export_encoder(build_unet("resnet18"), tmp_path / "run", {"encoder": "resnet18", "image_size": SIZE})
    n = 12
    out = tmp_path / "p004"
    rc = _main()(["compare", "--config", str(REPO / "launch/configs/protocol_seed004.yaml"),
                  "--shards", str(phantom_shards(tmp_path_factory)[1]), str(nih_shards(tmp_path_factory)),
                  "--backbones", str(tmp_path / "run" / "encoder.pt"), "scratch:resnet18", "--names", "ssl", "scratch",
                  "--per-class", str(n), "--seeds", "0", "1", "--epochs", "1", "--image-size", "32",
                  "--batch-size", "16", "--scorecam-per-class", "1", "--scorecam-max-channels", "8", "--device", "cpu",
                  "--out", str(out), "--wandb", "disabled", "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    counts = {s: np.array(c) for s, c in m["counts"].items()}
    assert (sum(counts.values()) == n).all()  # n images of every class, over the three splits
    total = 3 * n
    for s, frac in (("train", 0.64), ("val", 0.16), ("test", 0.20)):
        assert abs(counts[s].sum() / total - frac) < 0.15, (s, counts[s])
    assert m["per_class"] == n and len(m["runs"]) == 4 and set(m["summary"]) == {"ssl", "scratch"}
    text = (out / "compare_table.md").read_text()
    assert "| ssl |" in text and "| scratch |" in text and "split (patient-grouped)" in text
    for label in ("ssl", "scratch"):
        assert (out / f"confusion_{label}.png").stat().st_size > 1000
        cams = list((out / "scorecam" / label).glob("*.png"))
        assert {p.name.split("_", 1)[0] for p in cams} == set(DIAGNOSIS_CLASSES)
