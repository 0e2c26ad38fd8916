"""Downstream on a GPU: every test here needs CUDA and skips without it (`make gpu-check` runs this file).

They check that the work really happens on the device: the model, features, Score-CAM and streamed
training run there under bf16 autocast, results match the CPU within bf16 tolerance, and a Ray trial
given a GPU (`gpus_per_trial`) trains on it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_downstream import SIZE, nih_shards, phantom_shards

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_picks_the_gpu_and_autocast_is_bf16():
    from downstream.device import autocast, parse_device, to_float

    dev = parse_device("auto")
    assert dev.type == "cuda" and parse_device("cuda:0") == torch.device("cuda", 0)
    x = to_float(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8), dev)
    assert x.is_cuda and x.dtype == torch.float32
    with autocast(dev):
        assert (torch.ones(4, 4, device=dev) @ torch.ones(4, 4, device=dev)).dtype == torch.bfloat16


def test_features_on_gpu_match_cpu():
    from downstream.backbones import load_backbone
    from downstream.severity import extract_features

    torch.manual_seed(0)
    bb = load_backbone("scratch:resnet18", image_size=64)
    x = torch.randint(0, 256, (6, 1, 64, 64), dtype=torch.uint8)
    cpu = extract_features(bb, x, "multiscale", flips=("none", "hv"), device=torch.device("cpu"))
    gpu = extract_features(bb, x, "multiscale", flips=("none", "hv"), device=torch.device("cuda"))
    assert next(bb.parameters()).is_cuda
    for f in ("none", "hv"):
        assert gpu[f].dtype == np.float32
        rel = np.abs(gpu[f] - cpu[f]).mean() / (np.abs(cpu[f]).mean() + 1e-8)
        assert rel < 0.05, (f, rel)  # bf16 autocast


def test_diagnosis_trains_on_gpu_with_scorecam(tmp_path_factory, tmp_path):
    from downstream.diagnosis import train_diagnosis, write_outputs

    shards = phantom_shards(tmp_path_factory)[1]
    res = train_diagnosis({"shards": [str(shards)], "backbone": "scratch:resnet18", "image_size": SIZE,
                           "epochs": 2, "batch_size": 16, "device": "cuda", "progress": False,
                           "scorecam_per_class": 1, "scorecam_max_channels": 16})
    assert next(res["model"].parameters()).is_cuda and res["config"]["device"] == "cuda:0"
    assert np.isfinite(res["history"][-1]["train_loss"]) and res["test"]["n"] > 0
    files = write_outputs(res, res["data"], tmp_path / "dx")
    assert len(files["scorecam"]) == 3
    m = json.loads((tmp_path / "dx" / "metrics.json").read_text())
    assert m["device"] == "cuda:0"


def test_nih14_streams_and_trains_on_gpu(tmp_path_factory):
    from downstream.nih14 import train_nih14

    res = train_nih14({"shards": [str(nih_shards(tmp_path_factory))], "backbone": "scratch:resnet18",
                       "image_size": SIZE, "epochs": 1, "batch_size": 8, "device": "cuda", "progress": False,
                       "resplit": True})
    assert res["streamed"] and res["config"]["device"] == "cuda:0"
    assert np.isfinite(res["history"][0]["train_loss"])


def test_scorecam_on_gpu_matches_cpu_classes():
    from downstream.backbones import load_backbone
    from downstream.finetune import Classifier
    from downstream.scorecam import score_cam

    torch.manual_seed(0)
    model = Classifier(load_backbone("scratch:resnet18"), 3).eval()
    x = torch.rand(2, 1, 64, 64)
    maps_cpu, _ = score_cam(model, x, target=1, max_channels=16, device=torch.device("cpu"))
    maps_gpu, classes = score_cam(model, x, target=1, max_channels=16, device=torch.device("cuda"))
    assert maps_gpu.device.type == "cpu" and classes.tolist() == [1, 1]
    assert float((maps_gpu - maps_cpu).abs().mean()) < 0.1


def test_ray_trial_given_a_gpu_trains_on_it(tmp_path_factory, tmp_path):
    import ray

    from downstream.config import SweepConfig
    from downstream.sweep import init_ray, run_sweep
    from runkit.tracking import read_jsonl

    shards = phantom_shards(tmp_path_factory)[1]
    space = tmp_path / "dx.yaml"
    space.write_text("mode: linear\nepochs: 1\nbatch_size: 16\nlr: 0.01\n")
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2, num_gpus=1, verbose=0)
    try:
        out = tmp_path / "sweep"
        s = SweepConfig(task="diagnosis", shards=[str(shards)], backbone="scratch:resnet18", space=str(space),
                        out=str(out), num_samples=1, scheduler="fifo", gpus_per_trial=1, image_size=SIZE,
                        wandb_mode="disabled", device="cuda")
        result = run_sweep(s, verbose=0)
    finally:
        ray.shutdown()
    trial = result["best"]["trial_id"]
    rows = read_jsonl(out / "trials" / trial / "metrics.jsonl")
    assert rows and all(r["on_gpu"] == 1.0 for r in rows), rows
