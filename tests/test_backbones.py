"""Backbones of every origin load into one interface, and a wrong file fails with the key listing."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from downstream.backbones import (
    CHEXNET_PATHOLOGIES,
    XRV_PATHOLOGIES,
    load_backbone,
    save_nih14,
    select_pathologies,
)
from runkit.errors import UserError


def _densenet(in_ch: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.densenet121(weights=None, num_classes=classes)
    if in_ch != 3:
        m.features.conv0 = nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False)
    m.eval()
    return m


def test_scratch_interface():
    bb = load_backbone("scratch:resnet18", image_size=64).eval()
    x = torch.rand(2, 1, 64, 64)
    fmap = bb(x)
    assert fmap.shape == (2, 512, 2, 2)
    assert bb.pooled(x).shape == (2, bb.num_features) == (2, 512)
    assert len(bb.stage_modules()) >= 5
    with pytest.raises(UserError, match="no pathology outputs"):
        bb.pathologies(x)


def test_xrv_state_dict_loads_with_its_scaling_and_18_named_outputs(tmp_path):
    ref = _densenet(1, 18)
    state = ref.state_dict()
    state["op_threshs"] = torch.rand(18)  # xrv keeps this buffer; it must be tolerated
    torch.save(state, tmp_path / "xrv.pt")
    bb = load_backbone(f"xrv:{tmp_path / 'xrv.pt'}").eval()
    assert bb.image_size == 224 and bb.pathology_names == XRV_PATHOLOGIES
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expect = ref(x * 2048 - 1024)  # xrv input range [-1024, 1024]
        got = bb.pathologies(x)
    assert got.shape == (2, 18)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    assert bb.pooled(x).shape == (2, 1024)


def test_chexnet_checkpoint_with_old_keys_loads(tmp_path):
    ref = _densenet(3, 14)
    state = {}
    for k, v in ref.state_dict().items():
        k = k.replace("classifier.", "classifier.0.")
        k = k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2.")  # pre-0.4 torchvision naming
        state["module.densenet121." + k] = v
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "chexnet.pth.tar")
    bb = load_backbone(f"chexnet:{tmp_path / 'chexnet.pth.tar'}").eval()
    assert bb.pathology_names == CHEXNET_PATHOLOGIES
    x = torch.rand(2, 1, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(bb.pathologies(x), ref((x.expand(-1, 3, -1, -1) - mean) / std),
                                   rtol=1e-4, atol=1e-4)


def test_wrong_file_lists_missing_and_unexpected_keys(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pt")
    for kind in ("xrv", "chexnet"):
        with pytest.raises(UserError, match=r"missing keys \['classifier.*unexpected keys \['bn1"):
            load_backbone(f"{kind}:{tmp_path / 'resnet.pt'}")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole pickled module: refused by weights_only
    with pytest.raises(UserError, match="weights_only"):
        load_backbone(f"xrv:{tmp_path / 'pickled.pt'}")
    with pytest.raises(UserError, match="not found"):
        load_backbone(f"xrv:{tmp_path / 'absent.pt'}")
    with pytest.raises(UserError, match="not understood"):
        load_backbone("imagenet")


def test_genesis_export_and_nih14_roundtrip(tmp_path):
    from pretrain.model import build_unet, export_encoder

    torch.manual_seed(1)
    unet = build_unet("resnet18")
    export_encoder(unet, tmp_path / "run", {"encoder": "resnet18", "image_size": 64})
    bb = load_backbone(str(tmp_path / "run" / "encoder.pt")).eval()
    assert bb.kind == "genesis" and bb.image_size == 64
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), unet.encoder.eval()(x)[-1])

    bb.classifier = nn.Linear(512, 14)
    bb.pathology_names = tuple(f"f{i}" for i in range(14))
    save_nih14(bb, tmp_path / "nih14")
    back = load_backbone(f"nih14:{tmp_path / 'nih14'}").eval()
    with torch.no_grad():
        torch.testing.assert_close(back.pathologies(x), bb.pathologies(x))


def test_pathology_names_match_loosely():
    assert select_pathologies(XRV_PATHOLOGIES, "lung_opacity,pneumonia") == [16, 8]
    assert select_pathologies(XRV_PATHOLOGIES, ["Lung Opacity"]) == [16]
    with pytest.raises(UserError, match="unknown pathology 'covid'"):
        select_pathologies(XRV_PATHOLOGIES, "covid")
