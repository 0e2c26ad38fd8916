"""Severity regression on frozen features: the head beats the mean predictor, reads the CSV via the shards."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from downstream.severity import extract_features, fit_severity_head


@pytest.fixture(scope="module")
def severity_shards(tmp_path_factory):
    """ieee8023-format phantoms whose annotations/covid-severity-scores.csv the source joins into the records."""
    from shards.__main__ import main as shards_main
    from shards.synth import synth_covid

    root = tmp_path_factory.mktemp("sev")
    synth_covid(root / "raw" / "covid-chestxray", 130, size=128, seed=5)
    shards_main(["build", "covid-chestxray", "--src", str(root / "raw" / "covid-chestxray"),
                 "--out", str(root / "shards"), "--size", "64", "--workers", "1"])
    return root / "shards"


def test_head_fits_a_linear_signal_and_clips():
    rng = np.random.default_rng(0)
    n = 80
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = np.stack([np.clip(4 + 2 * x[:, 0], 0, 8), np.clip(3 + x[:, 1], 0, 6)], 1)
    feats = {"names": [f"f{i}" for i in range(6)], "none": x, "h": x, "v": x}
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
    from downstream.backbones import load_backbone

    bb = load_backbone("scratch:resnet18").eval()
    x = torch.rand(3, 1, 32, 32)
    f = extract_features(bb, x, "pooled", flips=("none", "h"))
    with torch.no_grad():
        np.testing.assert_allclose(f["h"], bb.pooled(x.flip(3)).numpy(), rtol=1e-4, atol=1e-5)
    assert f["none"].shape == (3, 512) and len(f["names"]) == 512


def test_frozen_features_beat_mean_predictor_on_phantoms(severity_shards, tmp_path, repo_root):
    out = tmp_path / "sev"
    cmd = [sys.executable, "launch/downstream.py", "severity", "--shards", str(severity_shards),
           "--backbone", "scratch:resnet18", "--image-size", "64", "--repeats", "10", "--out", str(out),
           "--wandb", "disabled", "--no-progress"]
    done = subprocess.run(cmd, cwd=repo_root, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] >= 60  # scored images come from covid-severity-scores.csv through the shards
    for t in ("geographic_mean", "opacity_mean"):
        model, base = m["targets"][t]["model"], m["targets"][t]["baseline"]
        assert model["mse"]["mean"] < 0.6 * base["mse"]["mean"], (t, model, base)
        assert model["pearson_r"]["mean"] > 0.5
        assert (out / f"scatter_{t}.png").stat().st_size > 1000
    assert "mean predictor" in (out / "severity_table.md").read_text()


def test_pathology_features_need_a_pathology_head(severity_shards, tmp_path, repo_root):
    cmd = [sys.executable, "launch/downstream.py", "severity", "--shards", str(severity_shards),
           "--backbone", "scratch:resnet18", "--features", "lung_opacity", "--out", str(tmp_path / "o"),
           "--wandb", "disabled"]
    done = subprocess.run(cmd, cwd=repo_root, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no pathology outputs" in done.stderr
