"""Pretraining on a GPU: every test here needs CUDA and skips without it (`make gpu-check` runs this file).

fp16 has no CPU path in DeepSpeed here, so its run-and-export test lives only here; the bf16 ZeRO-2 test
repeats on the GPU what tests/test_pretrain_resume.py checks on 2 CPU ranks.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from test_pretrain import PY, REPO, base_cmd, make_shards, run_env
from test_pretrain_resume import check_exact_export

from pretrain import checkpoint as ckpt
from runkit.tracking import read_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_env() -> dict:
    env = run_env()
    env.pop("DS_ACCELERATOR", None)
    return env


@pytest.mark.parametrize("config,precision,mode,zero", [
    ("launch/configs/ds_zero2_bf16.json", "bf16", "autocast", 2),
    ("launch/configs/ds_zero1_fp16.json", "fp16", "deepspeed", 1),
])
def test_gpu_config_trains_and_exports_fp32_master_weights(tmp_path, config, precision, mode, zero):
    shards = make_shards(tmp_path / "shards")
    out = tmp_path / "run"
    r = subprocess.run([PY, *base_cmd(shards, out, "--deepspeed_config", config, "--max-steps", "8",
                                      "--checkpoint-every", "8", "--val-every", "4", "--lr", "1.0")],
                       cwd=REPO, env=_gpu_env(), check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"on cuda, {precision} ({mode}), ZeRO {zero}" in r.stdout
    rows = [row for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert all(row["gpu_mem_peak_gib"] > 0 for row in rows)
    check_exact_export(out, ckpt.tag_for(8), zero_stage=zero)
    desc = json.loads((out / "last" / "encoder.json").read_text())
    assert (desc["precision"], desc["precision_mode"], desc["zero_stage"]) == (precision, mode, zero)


@pytest.mark.parametrize("how", ["autocast", "deepspeed"])
def test_probe_features_on_the_gpu_match_the_cpu(how):
    """The online probe's feature extraction as the trainer calls it on a GPU: bf16 autocast over fp32
    weights, or (DeepSpeed's fp16 mode) a half model fed a half input; features agree with fp32 on the CPU."""
    import numpy as np

    from pretrain.model import build_unet
    from pretrain.probes import encoder_features

    torch.manual_seed(0)
    encoder = build_unet("resnet18").encoder.eval()
    images = torch.randint(0, 256, (20, 1, 64, 64), dtype=torch.uint8)
    ref = encoder_features(encoder, images, device=torch.device("cpu"))
    gpu = torch.device("cuda")
    if how == "autocast":
        got = encoder_features(encoder.to(gpu), images, device=gpu, autocast_dtype=torch.bfloat16)
    else:
        got = encoder_features(encoder.to(gpu, torch.float16), images, device=gpu, input_dtype=torch.float16)
    for kind in ("pooled", "multiscale"):
        assert got[kind].dtype == np.float32 and got[kind].shape == ref[kind].shape
        rel = np.abs(got[kind] - ref[kind]).max() / np.abs(ref[kind]).max()
        assert rel < 0.05, (kind, rel)
