"""Online probes (pretrain/probes.py), the blur- and flat-proof validation baselines and the collapse check
(pretrain/validation.py), through the real pretraining loop where it matters."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_downstream import SIZE, phantom_shards

from pretrain.probes import encoder_features, fit_probes, gain, load_probe_set
from pretrain.validation import CollapseCheck, RestorationStats


def _probe_set(tmp_path_factory):
    return load_probe_set(str(phantom_shards(tmp_path_factory)[1]), image_size=SIZE)


def _scores(encoder, data) -> dict:
    return fit_probes(encoder_features(encoder, data.images, device=torch.device("cpu")), data)


@pytest.mark.slow
def test_probe_scores_an_encoder_trained_on_the_data_above_its_random_init(tmp_path_factory):
    """The probe must tell an informative encoder from a random one. The encoder is trained (supervised, on
    the diagnosis labels) on half of the phantoms' patients and probed on the other half only, beside the
    same architecture with its random init and with a second random init: the trained one scores clearly
    higher on every diagnosis probe. (Genesis restoration on these phantoms does not move the probes within
    a CPU test's budget: see docs/RESULTS.md.)"""
    from pretrain.model import build_unet

    data = _probe_set(tmp_path_factory)
    groups = np.unique(data.groups)
    rng = np.random.default_rng(0)
    train_groups = set(rng.permutation(groups)[: len(groups) // 2])
    is_train = np.array([g in train_groups for g in data.groups])
    tr, te = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    held_out = type(data)(data.images[torch.as_tensor(te)], data.targets[te], data.groups[te])

    torch.manual_seed(0)
    random_encoder = build_unet("resnet18", cbam_decoder=False).encoder
    torch.manual_seed(0)
    encoder = build_unet("resnet18", cbam_decoder=False).encoder
    head = torch.nn.Linear(encoder.out_channels[-1], 3)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-3)
    x = data.images[torch.as_tensor(tr)].float().div(255)
    y = torch.as_tensor(data.diagnosis[tr])
    gen = torch.Generator().manual_seed(0)
    encoder.train()
    for _ in range(60):
        idx = torch.randint(len(tr), (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(head(encoder(x[idx])[-1].mean((2, 3))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    trained = _scores(encoder, held_out)
    randoms = [_scores(random_encoder, held_out)]
    torch.manual_seed(1)
    randoms.append(_scores(build_unet("resnet18", cbam_decoder=False).encoder, held_out))
    keys = [f"probe/{kind}/diagnosis_{m}" for kind in ("pooled", "multiscale")
            for m in ("auroc", "bacc", "knn_auroc", "knn_bacc")]
    gains = {k: gain(k, trained[k], max(r[k] for r in randoms)) for k in keys}
    report = {k: (round(trained[k], 3), [round(r[k], 3) for r in randoms]) for k in keys}
    # Measured (2 threads): every gain over the better random init 0.05-0.15, mean 0.09.
    assert all(g > 0 for g in gains.values()), report
    assert np.mean(list(gains.values())) > 0.05, report


@pytest.mark.slow
def test_online_probes_reference_and_collapse_through_the_training_loop(tmp_path_factory, tmp_path, monkeypatch,
                                                                          capfd):
    """One in-process run with probes at steps 0, 6 and 12 and validation every 2 steps; from step 11 on, a
    debug hook zeroes the output layer (a constant restoration). The step-0 probe is the random init (the
    same numbers as a freshly seeded model), is kept in probe_reference.json and is logged beside every
    later probe. The collapse warning fires once, at the first validation after the collapse, and not
    while the model is healthy; the validation rows carry the blur and mean-image baselines."""
    from pretrain import engine as engine_mod
    from pretrain.model import build_unet
    from runkit.tracking import read_jsonl
    from runkit.typed import parse_layered

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    shards = phantom_shards(tmp_path_factory)[1]
    out = tmp_path / "run"
    argv = ["--train-shards", str(shards / "train-*.tar"), "--val-shards", str(shards / "val-*.tar"),
            "--probe-shards", str(shards), "--out", str(out), "--deepspeed_config", "launch/configs/ds_cpu.json",
            "--encoder", "tu-mobilenetv3_small_050", "--image-size", "32", "--batch-size", "8",
            "--epoch-size", "64", "--num-workers", "0", "--lr", "3", "--warmup-steps", "1", "--max-steps", "14",
            "--log-every", "2", "--val-every", "2", "--checkpoint-every", "14", "--probe-every", "6",
            "--debug-collapse-at-step", "11", "--collapse-ratio", "0.01", "--wandb-mode", "disabled"]
    assert engine_mod.run(parse_layered(engine_mod.build_parser(), argv)) == 0
    err = capfd.readouterr().err
    rows = read_jsonl(out / "metrics.jsonl")

    probes = [r for r in rows if "probe/multiscale/diagnosis_auroc" in r]
    assert [r["step"] for r in probes] == [0, 6, 12, 14]
    ref = json.loads((out / "probe_reference.json").read_text())["metrics"]
    assert ref == {k: v for k, v in probes[0].items() if k.startswith("probe/") and k != "probe/seconds"}
    data = load_probe_set(str(shards), image_size=32, max_samples=1000, seed=0)
    torch.manual_seed(0)
    fresh = _scores(build_unet("tu-mobilenetv3_small_050").encoder, data)
    assert fresh == pytest.approx({k: ref[k] for k in fresh}, abs=1e-6)  # the reference is the random init
    for r in probes[1:]:
        assert r["probe_ref/multiscale/diagnosis_auroc"] == ref["probe/multiscale/diagnosis_auroc"]
        assert r["probe_gain/multiscale/diagnosis_auroc"] == pytest.approx(
            r["probe/multiscale/diagnosis_auroc"] - ref["probe/multiscale/diagnosis_auroc"])
        assert r["probe_gain/multiscale/severity_mse"] == pytest.approx(
            ref["probe/multiscale/severity_mse"] - r["probe/multiscale/severity_mse"])
        assert 0 < r["probe/cost_fraction"]

    vals = {r["step"]: r for r in rows if "val/ssim" in r}
    assert sorted(vals) == list(range(2, 15, 2))
    # Measured ratios: 0.0005, 0.018, 0.11, 0.074, 0.089 at steps 2-10, exactly 0 after the collapse. The
    # threshold is 0.01 here, not the default 0.05: lr 3 is chaotic enough that a healthy step-8 ratio has
    # dipped under 0.05 on another CPU, and this test is about the detector, not about that margin.
    ratios = {s: round(vals[s]["val/spread_ratio"], 4) for s in vals}
    assert all(ratios[s] >= 0.01 for s in (6, 8, 10)), ratios  # it did learn to depend on the input
    assert ratios[12] < 0.001 and ratios[14] < 0.001, ratios
    assert [s for s in vals if "val/collapse_warning" in vals[s]] == [12]
    assert err.count("warning: restorations have collapsed at step 12") == 1, err[-3000:]
    for v in vals.values():
        baselines = [v["val/ssim_identity"], v["val/ssim_blur"], v["val/ssim_mean_image"]]
        assert v["val/ssim_margin"] == pytest.approx(v["val/ssim"] - max(baselines))
        assert v["val/blur_sigma"] in (1.0, 2.0, 4.0) and 0 < v["val/ssim_mean_image"] < 1


def test_probe_set_is_the_whole_set_on_any_rank(tmp_path_factory, monkeypatch):
    """Rank 0 of a 2-rank job probes every labelled image, not its rank's share of the shards."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = _probe_set(tmp_path_factory)
    assert len(data) == 180 and data.describe().startswith("180 images")
    assert len(load_probe_set(str(phantom_shards(tmp_path_factory)[1]), image_size=SIZE, max_samples=50)) <= 50


def test_collapse_check_and_baselines_on_synthetic_restorations():
    """Restorations equal to the originals are healthy; the mean image as every answer scores the
    mean-image baseline exactly; a constant restoration has spread ratio 0."""
    gen = torch.Generator().manual_seed(0)
    from pretrain.validation import blur

    smooth = blur(torch.rand(6, 1, 32, 32, generator=gen), 3.0)  # smooth images, like radiographs
    target = (smooth - smooth.amin()) / (smooth.amax() - smooth.amin())
    noisy = (target + 0.3 * torch.randn(6, 1, 32, 32, generator=gen)).clamp(0, 1)
    mean = target.mean(0, keepdim=True)

    def metrics(restored):
        s = RestorationStats(torch.device("cpu"))
        s.add(restored, noisy, target, mean)
        s.add(restored[:1], noisy[:1], target[:1], mean)  # a batch of one adds no spread
        return s.reduce(lambda v, _device: v)

    good, flat = metrics(target.clone()), metrics(mean.expand_as(target).clone())
    assert good["val/spread_ratio"] == pytest.approx(1.0) and good["val/ssim"] == pytest.approx(1.0, abs=1e-4)
    assert flat["val/spread_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert flat["val/ssim"] == pytest.approx(flat["val/ssim_mean_image"]) and flat["val/ssim_margin"] <= 0
    assert good["val/ssim_blur"] > good["val/ssim_identity"]  # a blur beats the noisy input: the baseline bites
    assert good["val/count"] == 7

    check = CollapseCheck(max_steps=100)
    assert check.check(10, flat) is None      # flat early in a run: an untrained U-Net is flat
    assert check.check(20, good) is None
    assert "collapsed at step 30" in check.check(30, flat)
    assert check.check(40, flat) is None      # once
    late = CollapseCheck(max_steps=100)
    assert "still do not depend on the input at step 50" in late.check(50, flat)
