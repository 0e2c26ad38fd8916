"""Severity regression on frozen features: the head beats the mean predictor, reads the CSV via the shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_downstream import SIZE, severity_set

from downstream.backbones import load_backbone
from downstream.severity import extract_features, fit_severity_head, run_severity, write_outputs
from runkit.errors import UserError


def test_head_fits_a_linear_signal_and_clips():
    rng = np.random.default_rng(0)
    n = 80
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = np.stack([np.clip(4 + 2 * x[:, 0], 0, 8), np.clip(3 + x[:, 1], 0, 6)], 1)
    feats = {"names": [f"f{i}" for i in range(6)], "none": x, "h": x, "v": x, "hv": x}
    groups = np.arange(n) // 2  # two images per patient
    r = fit_severity_head(feats, y, {"repeats": 5, "regressor": "linear"}, groups=groups)
    g = r["targets"]["geographic_mean"]
    assert g["model"]["mse"]["mean"] < 0.2 * g["baseline"]["mse"]["mean"]
    assert g["model"]["pearson_r"]["mean"] > 0.9
    assert min(g["predictions"]["pred"]) >= 0 and max(g["predictions"]["pred"]) <= 8
    assert r["repeats"] == 5 and g["model"]["mse"]["n"] == 5
    # a named subset: only f1 carries opacity, so f0 alone cannot predict it
    sub = fit_severity_head(feats, y, {"repeats": 5, "columns": "f0", "targets": "opacity_mean"}, groups=groups)
    assert sub["features"] == 1
    assert sub["targets"]["opacity_mean"]["model"]["r2"]["mean"] < 0.3


def test_flip_features_are_flipped_images():
    bb = load_backbone("scratch:resnet18").eval()
    x = torch.rand(3, 1, 32, 32)
    f = extract_features(bb, x, "pooled", flips=("none", "h"))
    with torch.no_grad():
        np.testing.assert_allclose(f["h"], bb.pooled(x.flip(3)).numpy(), rtol=1e-4, atol=1e-5)
    assert f["none"].shape == (3, 512) and len(f["names"]) == 512


def test_frozen_features_beat_mean_predictor_on_phantoms(tmp_path_factory, tmp_path):
    data = severity_set(tmp_path_factory)
    assert len(data) >= 100  # scored images come from covid-severity-scores.csv through the shards
    assert data.targets.shape == (len(data), 2)
    torch.manual_seed(0)
    bb = load_backbone("scratch:resnet18", image_size=SIZE)
    result, cfg = run_severity({"backbone": "scratch:resnet18", "repeats": 8, "progress": False},
                               data=data, backbone=bb)
    for t in ("geographic_mean", "opacity_mean"):
        model, base = result["targets"][t]["model"], result["targets"][t]["baseline"]
        assert model["mse"]["mean"] < 0.6 * base["mse"]["mean"], (t, model, base)
        assert model["pearson_r"]["mean"] > 0.6, (t, model)
        assert base["r2"]["mean"] <= 0.0 < model["r2"]["mean"]
    files = write_outputs(result, cfg, tmp_path / "sev")
    m = json.loads((tmp_path / "sev" / "metrics.json").read_text())
    assert m["n"] == len(data) and m["repeats"] == 8 and "per_repeat" not in m["targets"]["opacity_mean"]
    for t in ("geographic_mean", "opacity_mean"):
        assert (tmp_path / "sev" / f"scatter_{t}.png").stat().st_size > 1000
        preds = m["targets"][t]["predictions"]["pred"]
        assert min(preds) >= 0 and max(preds) <= (8 if t == "geographic_mean" else 6)
    assert "mean predictor" in Path(files["table"]).read_text()


def test_pathology_features_need_a_pathology_head(tmp_path_factory):
    data = severity_set(tmp_path_factory)
    with pytest.raises(UserError, match="no pathology outputs"):
        run_severity({"backbone": "scratch:resnet18", "features": "lung_opacity", "repeats": 2,
                      "progress": False}, data=data.subset(range(8)))


def test_multiscale_features_are_every_stage_pooled():
    bb = load_backbone("scratch:resnet18").eval()
    x = torch.rand(2, 1, 64, 64)
    f = extract_features(bb, x, "multiscale", flips=("none", "v"))
    assert f["none"].shape == (2, 64 + 64 + 128 + 256 + 512) and len(f["names"]) == f["none"].shape[1]
    assert f["names"][0] == "s1_f0" and f["names"][-1] == "s5_f511"
    with torch.no_grad():
        np.testing.assert_allclose(f["none"][:, -512:], bb.pooled(x).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f["v"][:, -512:], bb.pooled(x.flip(2)).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="feature kind"):
        extract_features(bb, x, "stages")
