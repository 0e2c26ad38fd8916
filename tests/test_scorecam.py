"""Score-CAM maps: right shape and range, and on phantoms brighter inside the rendered lesion than outside."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from downstream.backbones import load_backbone
from downstream.finetune import Classifier
from downstream.scorecam import score_cam


def test_maps_have_image_shape_and_unit_range():
    torch.manual_seed(0)
    model = Classifier(load_backbone("scratch:resnet18"), 3).eval()
    x = torch.rand(3, 1, 64, 48)
    maps, classes = score_cam(model, x, max_channels=64)
    assert maps.shape == (3, 64, 48)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert torch.equal(classes, model(x).argmax(1))
    maps2, _ = score_cam(model, (x * 255).to(torch.uint8), target=2, max_channels=64)
    assert maps2.shape == (3, 64, 48) and float(maps2.max()) <= 1.0


@pytest.mark.slow
def test_maps_are_higher_inside_the_lesion(tmp_path):
    """Train a small classifier on phantoms, then compare mean map value inside vs outside the true lesion."""
    from downstream.data import ImageSet
    from downstream.diagnosis import train_diagnosis
    from shards.synth import load_truth, synth_covid

    src = synth_covid(tmp_path / "covid-chestxray", 150, size=128, seed=7)
    import csv

    with open(Path(src) / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images, labels, lesions, records = [], [], [], []
    classes = {"covid": 0, "pneumonia": 1, "normal": 2}
    for i, row in enumerate(rows):
        masks, truth = load_truth(src, row["filename"])
        from PIL import Image

        img = np.asarray(Image.open(Path(src) / "images" / row["filename"]).convert("L").resize((64, 64)))
        images.append(img)
        labels.append(classes[truth["diagnosis"]])
        lesions.append(masks["lesion"].reshape(64, 2, 64, 2).mean(axis=(1, 3)) > 0.5)
        records.append({"key": f"k{i}", "source": "t", "patient_id": str(truth["patient"]),
                        "split": "", "labels": {}})
    data = ImageSet(torch.from_numpy(np.stack(images))[:, None], np.array(labels), records)
    res = train_diagnosis({"backbone": "scratch:resnet18", "image_size": 64, "epochs": 8, "lr": 3e-3,
                           "backbone_lr": 3e-3, "batch_size": 16, "progress": False, "scorecam_per_class": 0},
                          data=data)
    sick = [i for i in res["test_index"] if labels[i] != 2 and lesions[i].any()]
    maps, _ = score_cam(res["model"], data.float_images(sick), max_channels=128)
    inside = np.mean([maps[j][torch.from_numpy(lesions[i])].mean().item() for j, i in enumerate(sick)])
    outside = np.mean([maps[j][~torch.from_numpy(lesions[i])].mean().item() for j, i in enumerate(sick)])
    assert inside > outside, (inside, outside)
