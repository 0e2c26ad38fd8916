"""U-Net+CBAM construction, encoder export/load (smp and torchvision DenseNet) and the restoration loss."""
from __future__ import annotations

import json

import pytest
import torch

from pretrain.loss import RestorationLoss, psnr_per_sample, ssim_per_sample
from pretrain.model import (
    CbamEncoder,
    build_unet,
    encoder_to_torchvision_densenet,
    export_encoder,
    load_encoder,
)
from runkit.errors import UserError


def _cbam_name(m):
    return type(m).__name__


@pytest.mark.parametrize("encoder", ["resnet18", "densenet121"])
def test_unet_shapes_and_cbam_in_every_decoder_block(encoder):
    torch.manual_seed(0)
    model = build_unet(encoder).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 1, 64, 64))
    assert y.shape == (2, 1, 64, 64)
    assert 0.0 <= y.min() and y.max() <= 1.0  # sigmoid output
    blocks = list(model.decoder.blocks)
    assert len(blocks) == 5
    for i, b in enumerate(blocks):
        assert _cbam_name(b.attention2) == "CbamModule"
        assert b.attention2.channel.fc1.in_channels == b.conv2[0].out_channels
        if i < len(blocks) - 1:  # the last block has no skip, so smp never calls attention1
            assert _cbam_name(b.attention1) == "CbamModule"
            assert b.attention1.channel.fc1.in_channels == b.conv1[0].in_channels


def test_cbam_actually_in_forward_path():
    torch.manual_seed(0)
    model = build_unet("resnet18").eval()
    hits = []
    for b in model.decoder.blocks:
        for m in (b.attention1, b.attention2):
            if _cbam_name(m) == "CbamModule":
                m.register_forward_hook(lambda *a: hits.append(1))
    with torch.no_grad():
        model(torch.rand(1, 1, 64, 64))
    assert len(hits) == 9


def test_encoder_cbam_and_unknown_encoder():
    model = build_unet("resnet18", cbam_encoder=True)
    assert isinstance(model.encoder, CbamEncoder)
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(UserError, match="unknown encoder"):
        build_unet("resnet999")
    with pytest.raises(UserError, match="unknown timm encoder"):
        build_unet("tu-not_a_model")


def test_timm_encoder_builds():
    model = build_unet("tu-resnet10t", cbam_decoder=True)
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_export_loads_into_smp_and_load_encoder(tmp_path, arch):
    import segmentation_models_pytorch as smp

    torch.manual_seed(1)
    model = build_unet(arch, cbam_encoder=True)
    export_encoder(model, tmp_path, {"encoder": arch, "image_size": 64, "step": 7, "val": {"val/ssim": 0.5}})
    desc = json.loads((tmp_path / "encoder.json").read_text())
    assert desc["format"] == "xray-genesis-encoder/1" and desc["step"] == 7 and desc["cbam_encoder"] is True
    assert desc["in_channels"] == 1 and desc["input_range"] == [0, 1] and desc["image_size"] == 64
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    fresh = smp.Unet(arch, in_channels=1, encoder_weights=None).encoder
    torch.nn.Module.load_state_dict(fresh, state, strict=True)
    x = torch.rand(2, 1, 64, 64)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x)[-1], model.encoder.encoder(x)[-1])
        enc, d = load_encoder(tmp_path / "encoder.pt")
        enc.eval()
        assert torch.allclose(enc(x)[-1], model.encoder(x)[-1])
    assert d["encoder"] == arch


def test_load_encoder_names_mismatched_keys(tmp_path):
    model = build_unet("resnet18")
    export_encoder(model, tmp_path, {"encoder": "resnet18", "image_size": 64})
    desc = json.loads((tmp_path / "encoder.json").read_text())
    desc["encoder"] = "resnet34"
    (tmp_path / "encoder.json").write_text(json.dumps(desc))
    with pytest.raises(UserError, match="missing keys .*layer"):
        load_encoder(tmp_path)


def test_densenet_encoder_loads_into_torchvision_features_numerically(tmp_path):
    import torchvision

    torch.manual_seed(2)
    model = build_unet("densenet121")
    export_encoder(model, tmp_path, {"encoder": "densenet121", "image_size": 64})
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    features = torchvision.models.densenet121(weights=None).features
    features.load_state_dict(encoder_to_torchvision_densenet(state), strict=True)
    features.eval()
    model.eval()
    gray = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        tv = features(gray.repeat(1, 3, 1, 1))
        # smp's densenet encoder stops before norm5; torchvision's features end with it
        smp_last = model.encoder(gray)[-1]
        ref = model.encoder.features.norm5(smp_last)
    assert tv.shape == ref.shape == (2, 1024, 2, 2)
    assert torch.allclose(tv, ref, atol=1e-4, rtol=1e-4)


def test_loss_values():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    for kind in ("ssim", "ssim+l1"):
        assert RestorationLoss(kind)(x, x).item() == pytest.approx(0.0, abs=1e-5)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    l_ssim = RestorationLoss("ssim")(noisy, x).item()
    assert 0.2 < l_ssim < 1.2
    l_l1 = RestorationLoss("ssim+l1", l1_weight=1.0)(noisy, x).item()
    assert l_l1 == pytest.approx(l_ssim + (noisy - x).abs().mean().item(), rel=1e-4)
    # computed in fp32 even for bf16 model output
    assert RestorationLoss("ssim")(noisy.bfloat16(), x).dtype == torch.float32
    big = torch.rand(1, 1, 192, 192)
    assert RestorationLoss("ms-ssim", image_size=192)(big, big).item() == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(UserError, match="ms-ssim needs images of at least 161"):
        RestorationLoss("ms-ssim", image_size=128)
    with pytest.raises(UserError, match="unknown loss"):
        RestorationLoss("mse")
    assert ssim_per_sample(x, x).shape == (2,)
    assert psnr_per_sample(x, x).tolist() == [100.0, 100.0]
    assert psnr_per_sample(torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), 0.1)).item() == pytest.approx(20.0)
