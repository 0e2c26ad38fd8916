"""Large sets stream: NIH-14 (and diagnosis with `stream: on`) train from the shards one split at a time.

The streamed path must see exactly the images the in-memory path sees, in the patient-grouped splits of
the index, with predictions put back in index order (benchmarks/bench_nih14_stream.py measures memory).
"""
from __future__ import annotations

import numpy as np
import torch
from fixtures_downstream import nih_raw_shards, nih_shards, phantom_shards

from downstream.data import (
    KeySelect,
    diagnosis_target,
    findings_target,
    load_shards,
    scan_index,
    split_indices,
)
from downstream.streaming import StreamedSet


def test_streamed_split_predicts_like_the_in_memory_set(tmp_path_factory):
    from downstream.backbones import load_backbone
    from downstream.finetune import Classifier, predict_with_targets

    shards = str(nih_shards(tmp_path_factory))
    index = scan_index(shards, findings_target)
    splits = split_indices(index, resplit=True)
    part = index.subset(splits["val"])
    streamed = StreamedSet(part, findings_target, 32)
    memory = load_shards(shards, findings_target, image_size=32, keys=part.keys)
    assert sorted(r["key"] for r in memory.records) == sorted(part.keys.tolist())  # only those keys decoded
    torch.manual_seed(0)
    model = Classifier(load_backbone("scratch:resnet18", image_size=32), 14).eval()
    s_logits, s_targets = predict_with_targets(model, streamed, batch_size=5)
    m_logits, _ = predict_with_targets(model, memory, batch_size=7)
    order = [{r["key"]: i for i, r in enumerate(memory.records)}[k] for k in part.keys]
    np.testing.assert_allclose(s_logits.numpy(), m_logits.numpy()[order], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(s_targets, part.targets)  # the stream's labels, in index order
    batches = list(streamed.train_batches(batch_size=4, steps=3, seed=0))
    assert len(batches) == 3 and all(x.shape == (4, 1, 32, 32) for x, _ in batches)
    loader = streamed._train[1]  # kept for the next epoch (its workers, if any, persist)
    again = list(streamed.train_batches(batch_size=4, steps=3, seed=0, epoch=1))
    assert streamed._train[1] is loader and len(again) == 3 and loader.epoch == 2
    rec = dict(part.records[0], labels={"findings": []})
    select = KeySelect(findings_target, part.keys)  # what keeps the stream to this split
    assert select(rec) is not None and select({**rec, "key": "not-in-split"}) is None


def test_nih14_trains_streamed_and_exports(tmp_path_factory, tmp_path):
    """On raw shards (`--encoding raw`): the streamed uint8 batches are converted on the training device."""
    from downstream.backbones import load_backbone
    from downstream.nih14 import train_nih14, write_outputs

    shards = str(nih_raw_shards(tmp_path_factory))
    res = train_nih14({"shards": [shards], "backbone": "scratch:resnet18",
                       "image_size": 32, "epochs": 1, "batch_size": 8, "progress": False, "resplit": True,
                       "bn_recalibrate": 2, "device": "cpu"})
    assert res["streamed"] and sum(res["counts"].values()) == len(scan_index(shards, findings_target)) == 72
    assert np.isfinite(res["history"][0]["train_loss"]) and "mean_auroc" in res["test"]
    files = write_outputs(res, tmp_path / "nih14")
    bb = load_backbone(files["backbone_spec"])
    assert bb.pathology_names is not None and len(bb.pathology_names) == 14


def test_diagnosis_can_stream_and_then_weights_replace_the_sampler(tmp_path_factory, tmp_path):
    from downstream.diagnosis import train_diagnosis, write_outputs

    shards = str(phantom_shards(tmp_path_factory)[1])
    res = train_diagnosis({"shards": [shards], "backbone": "scratch:resnet18", "image_size": 32, "epochs": 1,
                           "batch_size": 16, "stream": "on", "progress": False, "bn_recalibrate": 1,
                           "scorecam_per_class": 1, "scorecam_max_channels": 4, "device": "cpu"})
    assert res["streamed"] and res["config"]["balance_used"] == "weights"
    assert res["test"]["n"] == len(res["splits"]["test"]) == len(res["test_probs"])
    files = write_outputs(res, res["data"], tmp_path / "dx")  # Score-CAM loads just its few images
    assert len(files["scorecam"]) == 3
    index = scan_index(shards, diagnosis_target)
    assert len(res["data"]) == len(index)


def test_bn_recalibration_skips_a_last_batch_of_one():
    """32 px through a ResNet-18 ends in 1x1 maps: a batch of one image cannot feed train-mode BatchNorm."""
    from downstream.backbones import load_backbone
    from downstream.finetune import Classifier, configure_trainable, recalibrate_bn, resolve

    torch.manual_seed(0)
    model = Classifier(load_backbone("scratch:resnet18", image_size=32), 3)
    configure_trainable(model, resolve({"mode": "full"}))
    images = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    recalibrate_bn(model, images, batches=4, batch_size=4)  # batches of 4 and 1
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 1
