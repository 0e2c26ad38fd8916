"""Score-CAM maps: right shape and range, and on phantoms brighter inside the rendered lesion than outside."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fixtures_downstream import lesion_masks, trained_diagnosis

from downstream.backbones import load_backbone
from downstream.finetune import Classifier
from downstream.scorecam import resolve_layer, score_cam, stage_maps


def test_maps_have_image_shape_and_unit_range():
    torch.manual_seed(0)
    model = Classifier(load_backbone("scratch:resnet18"), 3).eval()
    x = torch.rand(2, 1, 64, 48)
    maps, classes = score_cam(model, x, max_channels=16)
    assert maps.shape == (2, 64, 48)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert torch.equal(classes, model(x).argmax(1))
    maps2, classes2 = score_cam(model, (x * 255).to(torch.uint8), target=2, max_channels=16)
    assert maps2.shape == (2, 64, 48) and float(maps2.max()) <= 1.0 and classes2.tolist() == [2, 2]


def test_stage_maps_end_with_the_backbone_map_and_auto_layer_is_not_too_coarse():
    from downstream.backbones import Backbone, DenseBody, _densenet121

    torch.manual_seed(0)
    bb = load_backbone("scratch:resnet18").eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        stages = stage_maps(bb, x)
        assert [tuple(s.shape[1:]) for s in stages] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4),
                                                       (512, 2, 2)]
        assert torch.allclose(stages[-1], bb(x))
        dense = Backbone(DenseBody(_densenet121(1, 18).features), 1024, kind="xrv", arch="densenet121",
                         image_size=224, preprocess="xrv").eval()
        dstages = stage_maps(dense, x)
        assert [s.shape[-1] for s in dstages] == [32, 16, 8, 4, 2] and torch.allclose(dstages[-1], dense(x))
    shapes = [tuple(s.shape[-2:]) for s in stages]
    assert resolve_layer(shapes) == 3 and resolve_layer(shapes, -1) == 4 and resolve_layer(shapes, 0) == 0
    assert resolve_layer([(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]) == 4  # 224 px: the paper's stage
    assert resolve_layer([(4, 4), (2, 2), (1, 1)]) == 0 and resolve_layer([(2, 2), (1, 1)]) == 0
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(shapes, 5)
    model = Classifier(bb, 3).eval()
    for layer in (-1, 0, "auto"):
        maps, _ = score_cam(model, x, max_channels=8, layer=layer)
        assert maps.shape == (1, 64, 64) and 0.0 <= float(maps.min()) <= float(maps.max()) <= 1.0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known: on phantoms the trained classifier's maps are less lesion-focused "
                   "than a random-init network's (1.14x vs 1.22x inside/outside), because bright lesions excite "
                   "random conv features too; strict, so a fix that makes it pass is noticed")
def test_maps_are_higher_inside_the_lesion(tmp_path_factory):
    """The phantom classifier's maps, on test images with a rendered lesion: mean inside vs outside the mask.

    Maps explain each image's true class (covid or pneumonia, the lesion's class), on the default stage
    ("auto": 4x4 at 64 px). Judged against the same network with random weights on the same images, and
    a floor of 1.1x. Measured in session 3: 1.42x, 14 of 18 images higher inside. In session 4, with
    today's package versions (the same numbers at the session-3 commit, so not a code change), 1.14x
    (0.72 of images), while the random-init control gives 1.22x (all images): the old bar of 1.2x alone
    was passed by a random network, so it proved nothing. Against the control it fails: an open problem.
    """
    res, _ = trained_diagnosis(tmp_path_factory)
    data = res["data"]
    masks = lesion_masks(tmp_path_factory, data)
    sick = np.array([int(i) for i in res["test_index"] if data.targets[i] != 2 and masks[i].sum() >= 20])
    assert len(sick) >= 10
    images, labels = data.float_images(sick), torch.as_tensor(data.targets[sick]).long()
    masks_t = [torch.from_numpy(masks[i]) for i in sick]

    def inside_outside(model, check_classes: bool):
        maps = torch.zeros(len(sick), *images.shape[-2:])
        for c in labels.unique().tolist():
            sel = (labels == c).nonzero().squeeze(1)
            maps[sel], classes = score_cam(model, images[sel], target=c, max_channels=64)
            if check_classes:
                assert classes.tolist() == [c] * len(sel)
        inside = np.array([maps[j][m].mean().item() for j, m in enumerate(masks_t)])
        outside = np.array([maps[j][~m].mean().item() for j, m in enumerate(masks_t)])
        return inside, outside

    inside, outside = inside_outside(res["model"], True)
    # the control: the same network with its weights re-drawn at random, on the same images and classes
    rand = copy.deepcopy(res["model"]).eval()
    torch.manual_seed(0)
    for m in rand.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    r_in, r_out = inside_outside(rand, False)
    ratio, r_ratio = inside.mean() / outside.mean(), r_in.mean() / r_out.mean()
    print(f"inside/outside: trained {ratio:.3f} ({(inside > outside).mean():.2f} of images), "
          f"random init {r_ratio:.3f} ({(r_in > r_out).mean():.2f})")
    assert ratio > 1.1 and ratio > r_ratio + 0.1, (ratio, r_ratio)
    assert (inside > outside).mean() > 0.6, (inside > outside).mean()
