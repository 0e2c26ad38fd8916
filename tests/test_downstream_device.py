"""Device handling, exercised on the CPU (tests/test_downstream_cuda.py runs the same paths on a GPU):
the spec, autocast, uint8-then-convert, fit/predict/features/Score-CAM on an explicit device, Ray trial
resources and what a job records."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_downstream import SIZE, phantom_shards

from downstream.device import autocast, check_spec, parse_device, to_float, trial_device
from runkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def test_device_specs():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda0", ""):
        assert (check_spec(bad) is not None) or bad == ""
    with pytest.raises(UserError, match="device must be"):
        parse_device("tpu")
    with pytest.raises(UserError, match="cuda:99"):
        parse_device("cuda:99")
    if NO_CUDA:
        with pytest.raises(UserError, match="CUDA is not available"):
            parse_device("cuda")
    assert trial_device(0) == "cpu"
    if NO_CUDA:
        assert trial_device(1) == "cpu"  # asked for a GPU, none here: the CPU, not a crash


def test_autocast_and_uint8_conversion_on_cpu():
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    y = to_float(x, torch.device("cpu"))
    assert y.dtype == torch.float32 and torch.allclose(y, x.float() / 255)
    assert to_float(y, torch.device("cpu")) is not None and to_float(y, torch.device("cpu")).dtype == torch.float32
    meta = to_float(x, torch.device("meta"))  # the uint8 tensor moves, then converts, on the target device
    assert meta.device.type == "meta" and meta.dtype == torch.float32
    with autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32  # float32 on the CPU


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-only error path")
def test_cli_cuda_without_gpu_exits_2(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "launch" / "downstream.py"), run_name="dev_cli")["main"]
    with pytest.raises(SystemExit) as exc:
        main(["severity", "--shards", "x", "--device", "cuda", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "CUDA is not available" in err


def test_fit_features_and_scorecam_on_an_explicit_device():
    from downstream.backbones import load_backbone
    from downstream.data import ImageSet
    from downstream.diagnosis import evaluate_probs
    from downstream.finetune import Classifier, fit, pooled_features, predict_with_targets, resolve
    from downstream.scorecam import score_cam
    from downstream.severity import extract_features

    dev = torch.device("cpu")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 32, 32), dtype=torch.uint8)
    data = ImageSet(images, np.arange(12) % 3, [])
    model = Classifier(load_backbone("scratch:resnet18", image_size=32), 3)
    cfg = resolve({"epochs": 1, "batch_size": 4, "bn_recalibrate": 2, "progress": False, "affine": True,
                   "device": "cpu"})
    out = fit(model, data, data, cfg, multiclass=True, evaluate=evaluate_probs, monitor="macro_f1", device=dev)
    assert out["best_epoch"] == 1 and np.isfinite(out["history"][0]["train_loss"])
    assert next(model.parameters()).device == dev
    logits, targets = predict_with_targets(model, data, 5)
    assert logits.shape == (12, 3) and logits.device.type == "cpu" and targets is None
    f = pooled_features(model.backbone, images, 5, device=dev)
    g = extract_features(model.backbone, images, "pooled", flips=("none",), device=dev)["none"]
    np.testing.assert_allclose(f.numpy(), g, rtol=1e-5, atol=1e-6)
    maps, classes = score_cam(model, images[:2], max_channels=8, device=dev)
    assert maps.device.type == "cpu" and maps.shape == (2, 32, 32) and classes.shape == (2,)


def test_trials_get_the_gpus_ray_gives_them(tmp_path):
    from downstream.config import SweepConfig
    from downstream.sweep import build_trainable, run_sweep
    from downstream.trials import SweepContext

    s = SweepConfig(task="severity", shards=["x"], backbone="scratch:resnet18", space=None, out=str(tmp_path),
                    gpus_per_trial=0.5)
    ctx = SweepContext(task="severity", out_dir=str(tmp_path), sweep="s", backbone="scratch:resnet18", image_size=32,
                       gpus_per_trial=0.5)
    prep = {"data": type("D", (), {"targets": np.zeros((4, 2)), "groups": np.arange(4), "images": None})(),
            "splits": {}, "features": {"pooled": {}}}
    trainable = build_trainable(s, ctx, prep)
    resources = getattr(trainable, "_resources", None) or trainable.default_resource_request({})
    bundles = getattr(resources, "bundles", None) or [resources]
    assert any(float(b.get("GPU", b.get("gpu", 0))) == 0.5 for b in bundles), resources
    if NO_CUDA:
        with pytest.raises(UserError, match="no CUDA GPU"):
            run_sweep(s, verbose=0)


def test_severity_job_records_its_device(tmp_path_factory, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "launch" / "downstream.py"), run_name="dev_cli2")["main"]
    shards = phantom_shards(tmp_path_factory)[1]
    out = tmp_path / "sev"
    assert main(["severity", "--shards", str(shards), "--backbone", "scratch:resnet18", "--image-size", str(SIZE),
                 "--repeats", "2", "--flip", "h", "--alpha", "1", "10", "--device", "auto", "--out", str(out),
                 "--wandb", "disabled", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    want = "cpu" if NO_CUDA else "cuda:0"
    assert m["device"] == want and m["flip"] == "h" and m["alpha"] == [1.0, 10.0]
    assert f"device {want}" in capsys.readouterr().out
    assert len(m["targets"]["geographic_mean"]["alpha"]) == 2  # the grouped CV chose one alpha per repeat
