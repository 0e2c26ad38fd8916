"""Severity regression on frozen features: the head beats the mean predictor, reads the CSV via the shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_downstream import SIZE, diagnosis_set, severity_set

from downstream.backbones import load_backbone
from downstream.severity import extract_features, fit_severity_head, run_severity, write_outputs
from runkit.errors import UserError

# Genesis vs random frozen features (see the test at the end): 300 steps of batch 8, stages 1-2 pooled
GENESIS_STEPS, GENESIS_BATCH, RANDOM_SEEDS = 300, 8, (0, 1, 2)
GENESIS_STAGES = ",".join(f"s{s}_f{i}" for s, w in ((1, 64), (2, 64)) for i in range(w))  # multiscale names


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


@pytest.mark.slow
def test_genesis_pretrained_frozen_features_beat_random_weights(tmp_path_factory, tmp_path):
    """Models Genesis restoration on the (unlabelled) phantoms, then ridge severity from frozen features.

    300 steps of the project's restoration pretraining (U-Net, ResNet-18 encoder, no decoder CBAM, SSIM
    loss, Adam 1e-3, batch 8, 64 px), then `extract_features(kind="multiscale")` restricted (`columns`)
    to the GAP of encoder stages 1 and 2 (64 + 64 channels, stride 2 and 4), and the same 10
    patient-grouped ridge splits for the pretrained encoder and for the same architecture with random
    weights (seeds 0, 1, 2; same columns, head and splits).

    Why these stages: at this CPU budget restoration changes the shallow stages most (a U-Net restores
    mostly through its high-resolution skips); deeper stages stay near random. Measured (1 thread), relative
    MSE = Genesis / random mean, geographic / opacity, pretraining seeds 0-4 (the random mean is
    1.249 / 0.750; random seeds 0, 1, 2: 1.211/0.707, 1.209/0.759, 1.327/0.785):
        seed 0 0.885/0.829 (mean 0.857), seed 1 0.875/0.988 (0.932), seed 2 0.871/0.922 (0.897),
        seed 3 0.948/0.856 (0.902), seed 4 0.827/0.898 (0.863).
    Every seed beats the random mean on both targets and the worst random init; the opacity margin of
    seed 1 is thin (0.988). Held-out pretraining seeds, run after the recipe was chosen: seed 5
    1.085/0.913 (mean 0.999: worse than random on geographic extent, it would fail), seed 6 0.749/0.847,
    seed 7 0.792/0.952, seed 8 0.889/0.888. Over all nine seeds the Genesis encoder's MSE is 0.88x /
    0.90x the random mean: pretraining helps on average, and 8 of 9 seeds pass every assertion here. Earlier recipe (100 steps of batch 16, all five stages): mean ratios 0.93-1.10
    over seeds 0-4 (seeds 2 and 3 worse than random on geographic extent, 1.25/1.17x); stage 1 alone
    0.87-0.95; lr 2e-3 or 3e-3 (cosine, warm-up 10), lr 5e-4, ssim+l1 (weights 0.1, 1) and last-stage
    pooled features all had at least one of the five seeds at or above the random mean. This recipe was
    picked among about 15 recipe x feature combinations on the same five seeds, so its margin is an
    optimistic estimate; the random stream of `genesis_batch` moves the numbers by a few percent.
    Cost: about 100 s for this test on 1 thread (the 100 x 16 recipe took 54 s). 200 steps of batch 8
    (about 1.3x) gave mean ratios 0.86-0.96 over seeds 0-4, seed 2 0.960/0.960, above the 0.95 bar.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the numbers below are reproducible at a fixed thread count only
    try:
        _genesis_vs_random(tmp_path_factory, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _genesis_vs_random(tmp_path_factory, tmp_path) -> None:
    from pretrain.loss import RestorationLoss
    from pretrain.model import build_unet, export_encoder
    from pretrain.transforms import genesis_batch

    unlabelled = diagnosis_set(tmp_path_factory).images.float().div(255)
    torch.manual_seed(0)
    unet = build_unet("resnet18", cbam_decoder=False)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    loss_fn = RestorationLoss("ssim")
    gen = torch.Generator().manual_seed(0)
    unet.train()
    losses = []
    for _ in range(GENESIS_STEPS):
        batch = unlabelled[torch.randint(len(unlabelled), (GENESIS_BATCH,), generator=gen)]
        corrupted, target = genesis_batch(batch, generator=gen)
        loss = loss_fn(unet(corrupted), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])  # it did learn to restore
    export_encoder(unet, tmp_path / "run", {"encoder": "resnet18", "image_size": SIZE, "step": GENESIS_STEPS})

    data = severity_set(tmp_path_factory)
    images = data.images.float().div(255)

    def mse(backbone) -> np.ndarray:  # the same 10 patient-grouped splits for every backbone
        feats = extract_features(backbone, images, "multiscale", flips=("none", "h", "v", "hv"))
        r = fit_severity_head(feats, data.targets, {"repeats": 10, "columns": GENESIS_STAGES}, groups=data.groups)
        return np.array([r["targets"][t]["model"]["mse"]["mean"] for t in ("geographic_mean", "opacity_mean")])

    genesis = mse(load_backbone(str(tmp_path / "run" / "encoder.pt")))
    random = []
    for seed in RANDOM_SEEDS:
        torch.manual_seed(seed)
        random.append(mse(load_backbone("scratch:resnet18", image_size=SIZE)))
    random = np.array(random)
    relative = genesis / random.mean(axis=0)
    report = {"genesis": genesis.round(3), "random": random.round(3), "relative": relative.round(3)}
    # Better than the average random init on both targets, and by >= 5 % on their mean (seed 0 measured
    # 0.885/0.829x, the worst of seeds 0-4 0.932 on the mean); per-target margins move with float noise
    # (thread count), so the test pins 1 thread.
    assert (relative < 1.0).all() and relative.mean() < 0.95, report
    assert (genesis < random.max(axis=0)).all(), report  # never worse than the worst random init
