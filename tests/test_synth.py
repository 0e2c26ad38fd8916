"""Phantom generator: exact real formats, determinism, and labels that are true by construction."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import phantom, synth
from shards.__main__ import main as shards_main

SIZE = 96


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    nih = synth.synth_nih(root / "nih", 30, size=SIZE, seed=3)
    cov = synth.synth_covid(root / "covid-chestxray", 36, size=SIZE, seed=3)
    return root, nih, cov


def test_same_seed_gives_byte_identical_files(made, tmp_path):
    root, _, _ = made
    synth.synth_nih(tmp_path / "nih", 30, size=SIZE, seed=3)
    synth.synth_covid(tmp_path / "covid-chestxray", 36, size=SIZE, seed=3)
    assert _digests(tmp_path) == _digests(root)
    other = tmp_path / "other"
    synth.synth_covid(other / "covid-chestxray", 6, size=SIZE, seed=4)
    first = (other / "covid-chestxray" / "metadata.csv").read_text()
    assert first != (root / "covid-chestxray" / "metadata.csv").read_text()


def test_image_does_not_depend_on_count(made, tmp_path):
    root, _, _ = made
    synth.synth_nih(tmp_path / "nih", 5, size=SIZE, seed=3)
    for p in (tmp_path / "nih" / "images").iterdir():
        assert p.read_bytes() == (root / "nih" / "images" / p.name).read_bytes()


def test_nih_format(made):
    _, nih, _ = made
    lines = (nih / synth.NIH_CSV).read_text().splitlines()
    assert lines[0] == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    rows = list(csv.reader(lines))
    assert len(rows[0]) == 11 and all(len(r) == 11 for r in rows[1:]) and len(rows) == 31
    labels = set()
    for r in rows[1:]:
        img = Image.open(nih / "images" / r[0])
        assert img.mode == "L" and img.size == (SIZE, SIZE)
        assert r[0] == f"{int(r[3]):08d}_{int(r[2]):03d}.png"
        assert r[6] in ("PA", "AP")
        labels.update(r[1].split("|"))
    assert "No Finding" in labels and len(labels - {"No Finding"}) >= 3
    assert labels - {"No Finding"} <= set(synth.NIH_RENDERED)
    assert max(int(r[2]) for r in rows[1:]) >= 1     # follow-ups exist


def test_nih_splits_patient_disjoint(made):
    _, nih, _ = made
    train = (nih / "train_val_list.txt").read_text().split()
    test = (nih / "test_list.txt").read_text().split()
    assert train and test
    assert sorted(train + test) == sorted(p.name for p in (nih / "images").iterdir())
    assert not {t.split("_")[0] for t in train} & {t.split("_")[0] for t in test}


def test_covid_format(made, shared_data):
    _, _, cov = made
    header = (cov / "metadata.csv").read_text().splitlines()[0]
    assert header.split(",") == list(synth.COVID_COLUMNS)
    real = (shared_data / "covid-chestxray-dataset" / "metadata.csv").open(encoding="latin-1").readline()
    assert real.rstrip("\r\n").rstrip(",").split(",") == list(synth.COVID_COLUMNS)
    rows = list(csv.DictReader((cov / "metadata.csv").open()))
    assert len(rows) == 36
    for r in rows:
        assert r["modality"] == "X-ray" and r["folder"] == "images"
        assert r["view"] in ("PA", "AP", "AP Supine")
        assert (cov / "images" / r["filename"]).is_file()
    findings = {r["finding"] for r in rows}
    assert {"Pneumonia/Viral/COVID-19", "No Finding"} <= findings
    assert any(f.startswith("Pneumonia/") and "COVID" not in f for f in findings)
    exts = {Path(r["filename"]).suffix for r in rows}
    assert ".png" in exts and exts & {".jpg", ".jpeg"}
    sev = (cov / synth.SEVERITY_CSV).read_text().splitlines()
    assert all(s.startswith("##") for s in sev[:5]) and sev[5] == "filename,geographic_mean,opacity_mean"
    assert not sev[6].startswith("##")


def _severity_rows(cov):
    lines = (cov / synth.SEVERITY_CSV).read_text().splitlines()[5:]
    return list(csv.DictReader(lines))


def test_severity_recomputed_from_masks_equals_csv(made):
    _, _, cov = made
    rows = _severity_rows(cov)
    assert len(rows) >= 20
    for r in rows:
        masks, params = synth.load_truth(cov, r["filename"])
        assert all(m.dtype == bool for m in masks.values())
        dens = {s: 0.0 for s in ("left", "right")}
        for les in params["render"]["lesions"]:          # densities straight from the rendering parameters
            if les["pixels"]:
                dens[les["side"]] = max(dens[les["side"]], les["density"])
        s = phantom.severity_from_masks(masks["lung_left"], masks["lung_right"], masks["lesion"],
                                        dens["left"], dens["right"])
        assert s["geographic_mean"] == float(r["geographic_mean"])
        assert s["opacity_mean"] == float(r["opacity_mean"])
        assert 0 <= s["geographic_mean"] <= 8 and 0 <= s["opacity_mean"] <= 6


def test_class_conditional_rendering(made):
    _, _, cov = made
    seen = set()
    for r in csv.DictReader((cov / "metadata.csv").open()):
        masks, params = synth.load_truth(cov, r["filename"])
        lesion = masks["lesion"]
        in_left = (lesion & masks["lung_left"]).sum()
        in_right = (lesion & masks["lung_right"]).sum()
        assert lesion.sum() == in_left + in_right             # lesions stay inside the lungs
        cls = params["diagnosis"]
        seen.add(cls)
        if cls == "normal":
            assert lesion.sum() == 0 and r["finding"] == "No Finding"
        elif cls == "pneumonia":
            assert (in_left > 0) != (in_right > 0)            # unilateral
            assert params["severity"]["opacity_mean"] >= 2    # dense
        else:
            assert in_left > 0 and in_right > 0               # bilateral
            for side in ("left", "right"):
                lung = masks[f"lung_{side}"]
                rows = np.nonzero(lung)[0]
                mid = (rows.min() + rows.max()) / 2
                les_rows = np.nonzero(lesion & lung)[0]
                lower = np.mean(les_rows > mid)
                assert lower >= np.mean(rows > mid)           # lower zone over-represented
                if les_rows.size < 0.5 * rows.size:
                    assert lower > 0.65                       # and dominant when not diffuse
    assert seen == {"covid", "pneumonia", "normal"}


def test_severity_spread_and_rules():
    assert [phantom.geographic_score(f) for f in (0, 0.1, 0.25, 0.49, 0.5, 0.75, 1.0)] == [0, 1, 2, 2, 3, 4, 4]
    assert [phantom.opacity_score(d, True) for d in (0.3, 0.5, 0.8)] == [1, 2, 3]
    assert phantom.opacity_score(0.8, False) == 0
    lung = np.zeros((10, 10), bool)
    lung[:, :5] = True
    other = np.zeros_like(lung)
    other[:, 5:] = True
    lesion = np.zeros_like(lung)
    lesion[:6, :5] = True                                      # 60 % of the left lung
    s = phantom.severity_from_masks(lung, other, lesion, 0.5, 0.0)
    assert (s["geographic_mean"], s["opacity_mean"]) == (3.0, 2.0)


def test_nih_findings_are_rendered(made):
    _, nih, _ = made
    for r in csv.DictReader((nih / synth.NIH_CSV).open()):
        masks, params = synth.load_truth(nih, r["Image Index"])
        opac = {"Pneumonia", "Consolidation", "Infiltration", "Effusion", "Mass", "Nodule", "Pneumothorax",
                "Atelectasis", "Edema"}
        labels = set(r["Finding Labels"].split("|"))
        if labels & opac:
            assert masks["lesion"].any()
        if labels == {"No Finding"}:
            assert not masks["lesion"].any() and params["render"]["cardiomegaly"] == 1.0
        if "Cardiomegaly" in labels:
            assert params["render"]["cardiomegaly"] >= 1.3


def test_pathology_changes_pixels_in_the_lesion():
    rng = np.random.default_rng(0)
    anat = phantom.sample_anatomy(rng)
    les = [{"kind": "lobar", "side": "right", "lobe": "lower", "fraction": 0.4, "density": 0.85}]
    clear = phantom.render(128, anat, [], "PA", np.random.default_rng(5))
    sick = phantom.render(128, anat, les, "PA", np.random.default_rng(5))
    m = sick.masks["lesion"]
    assert m.any() and not (m & sick.masks["lung_left"]).any()
    diff = sick.image.astype(float) - clear.image.astype(float)
    assert diff[m].mean() > 40 and abs(diff[~m & ~sick.masks["lung_right"]].mean()) < 3


def test_cli_writes_both_sets(tmp_path, capsys):
    out = tmp_path / "ph"
    argv = ["synth", "--out", str(out), "--n-nih", "4", "--n-covid", "3", "--size", "64", "--seed", "1"]
    assert shards_main(argv) == 0
    assert "nih" in capsys.readouterr().out
    for p in ("nih/Data_Entry_2017_v2020.csv", "nih/train_val_list.txt", "nih/test_list.txt",
              "covid-chestxray/metadata.csv", "covid-chestxray/annotations/covid-severity-scores.csv",
              "truth/nih/synth.json", "truth/covid-chestxray/synth.json"):
        assert (out / p).is_file(), p
    assert len(list((out / "nih" / "images").iterdir())) == 4
    assert len(list((out / "truth" / "nih").glob("*.npz"))) == 4
    assert shards_main(argv) == 0                               # re-running over its own output is fine
    meta = json.loads((out / "truth" / "nih" / "synth.json").read_text())
    assert meta["seed"] == 1


def test_cli_refuses_foreign_folder_and_bad_input(tmp_path):
    foreign = tmp_path / "x" / "nih"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        shards_main(["synth", "--out", str(tmp_path / "x"), "--n-covid", "0"])
    assert e.value.code == 2 and (foreign / "keep.txt").exists()
    with pytest.raises(SystemExit) as e:
        shards_main(["synth", "--out", str(tmp_path / "y"), "--n-nih", "-1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        shards_main(["synth", "--out", str(tmp_path / "y"), "--size", "8"])
    assert e.value.code == 2
