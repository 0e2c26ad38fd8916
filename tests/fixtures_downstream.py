"""Phantom data for the downstream tests, made once per pytest session and shared by every test file.

`synth_covid` draws ieee8023-format phantoms (covid / pneumonia / normal by patient, with
annotations/covid-severity-scores.csv), `shards.writer.build` turns them into 64 px shards, and
`load_shards` reads those once per task. The cache lives in this module (not in one file's fixture),
so test_diagnosis, test_severity, test_scorecam and test_backbones pay for it once between them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

N_IMAGES = 180
RAW_SIZE = 128
SIZE = 64
SEED = 3

_CACHE: dict[str, object] = {}


def phantom_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(raw phantom folder, 64 px shard folder), built on first use."""
    if "shards" not in _CACHE:
        from shards.sources import get_source
        from shards.synth import synth_covid
        from shards.writer import build

        root = tmp_path_factory.getbasetemp() / "downstream-phantoms"
        raw = synth_covid(root / "raw" / "covid-chestxray", N_IMAGES, size=RAW_SIZE, seed=SEED)
        out = root / "shards"
        result = build(get_source("covid-chestxray").scan(raw), out, source="covid-chestxray", size=SIZE,
                       workers=1, progress=False)
        assert result.samples == N_IMAGES, result.summary()
        _CACHE["shards"] = (Path(raw), out)
    return _CACHE["shards"]


def diagnosis_set(tmp_path_factory):
    """The phantoms as a 3-class `ImageSet` (with the shards' own patient-grouped splits)."""
    if "diagnosis" not in _CACHE:
        from downstream.diagnosis import load_diagnosis_data

        _CACHE["diagnosis"] = load_diagnosis_data(str(phantom_shards(tmp_path_factory)[1]), SIZE)
    return _CACHE["diagnosis"]


def severity_set(tmp_path_factory):
    """The severity-scored phantoms (read from covid-severity-scores.csv through the shards)."""
    if "severity" not in _CACHE:
        from downstream.severity import load_severity_data

        _CACHE["severity"] = load_severity_data(str(phantom_shards(tmp_path_factory)[1]), SIZE)
    return _CACHE["severity"]


def lesion_masks(tmp_path_factory, data) -> list[np.ndarray]:
    """Ground-truth lesion mask of every image of `data`, block-averaged from the rendering size to SIZE."""
    from shards.synth import load_truth

    raw = phantom_shards(tmp_path_factory)[0]
    f = RAW_SIZE // SIZE
    out = []
    for rec in data.records:
        masks, _ = load_truth(raw, Path(rec["meta"]["path"]).name)
        lesion = masks["lesion"].astype(np.float32)
        out.append(lesion.reshape(SIZE, f, SIZE, f).mean(axis=(1, 3)) > 0.5)
    return out


# A small full fine-tune, trained once: test_diagnosis checks what it learned and wrote,
# test_scorecam where its Score-CAM maps look.
TRAIN_CONFIG = {"backbone": "scratch:resnet18", "image_size": SIZE, "mode": "full", "epochs": 5, "batch_size": 16,
                "lr": 3e-3, "backbone_lr": 1e-3, "affine": False, "seed": 0, "progress": False,
                "scorecam_per_class": 1, "scorecam_max_channels": 64}


def trained_diagnosis(tmp_path_factory) -> tuple[dict, list[dict]]:
    """(train_diagnosis result, the per-epoch rows it reported)."""
    if "trained" not in _CACHE:
        from downstream.diagnosis import train_diagnosis

        rows: list[dict] = []
        result = train_diagnosis(dict(TRAIN_CONFIG), data=diagnosis_set(tmp_path_factory), report=rows.append)
        _CACHE["trained"] = (result, rows)
    return _CACHE["trained"]


N_NIH = 72


def nih_shards(tmp_path_factory) -> Path:
    """NIH-format phantoms (several images per patient) as 64 px shards of 12 samples each (so a stream
    crosses shard boundaries)."""
    if "nih" not in _CACHE:
        from shards.sources import get_source
        from shards.synth import synth_nih
        from shards.writer import build

        root = tmp_path_factory.getbasetemp() / "downstream-nih"
        raw = synth_nih(root / "raw" / "nih", N_NIH, size=RAW_SIZE, seed=SEED)
        out = root / "shards"
        result = build(get_source("nih").scan(raw), out, source="nih", size=SIZE, workers=1, progress=False,
                       max_count=12)
        assert result.samples == N_NIH, result.summary()
        _CACHE["nih"] = out
    return _CACHE["nih"]


def nih_raw_shards(tmp_path_factory) -> Path:
    """The same NIH phantoms as `nih_shards`, built by the CLI as raw shards (`--encoding raw`: uint8 `.npy`)."""
    if "nih_raw" not in _CACHE:
        from shards.__main__ import main

        nih_shards(tmp_path_factory)
        root = tmp_path_factory.getbasetemp() / "downstream-nih"
        out = root / "shards-raw"
        assert main(["build", "nih", "--src", str(root / "raw" / "nih"), "--out", str(out), "--size", str(SIZE),
                     "--max-count", "12", "--workers", "1", "--no-progress", "--encoding", "raw"]) == 0
        _CACHE["nih_raw"] = out
    return _CACHE["nih_raw"]


def patient_ids(records, idx) -> set[str]:
    """Patients of `records[idx]`, read from the records themselves (not through any `groups` property)."""
    return {f"{records[i]['source']}:{records[i]['patient_id']}" for i in idx}
