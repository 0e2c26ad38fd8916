"""3-class diagnosis: label mapping, metrics, learning phantom classes, and the CLI's outputs and errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from downstream.data import DIAGNOSIS_CLASSES, diagnosis_target
from downstream.metrics import classification_metrics


@pytest.fixture(scope="module")
def covid_shards(tmp_path_factory):
    """Phantoms in the ieee8023 format (covid / pneumonia / normal), built into 64 px shards."""
    from shards.__main__ import main as shards_main
    from shards.synth import synth_covid

    root = tmp_path_factory.mktemp("dx")
    synth_covid(root / "raw" / "covid-chestxray", 150, size=128, seed=3)
    shards_main(["build", "covid-chestxray", "--src", str(root / "raw" / "covid-chestxray"),
                 "--out", str(root / "shards"), "--size", "64", "--workers", "1"])
    return root / "shards"


def test_label_mapping_follows_seed_004():
    def rec(source, dx, findings):
        return {"source": source, "labels": {"diagnosis": dx, "findings": findings}}

    assert diagnosis_target(rec("covid-chestxray", "covid", None)) == 0
    assert diagnosis_target(rec("actualmed", "normal", None)) == 2
    assert diagnosis_target(rec("figure1", "other", None)) is None
    assert diagnosis_target(rec("nih", None, [])) == DIAGNOSIS_CLASSES.index("normal")
    assert diagnosis_target(rec("nih", None, ["Pneumonia", "Effusion"])) == DIAGNOSIS_CLASSES.index("pneumonia")
    assert diagnosis_target(rec("nih", None, ["Effusion"])) is None


def test_classification_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    prob = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    m = classification_metrics(y, prob, DIAGNOSIS_CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["covid"]["sensitivity"] == pytest.approx(0.5)
    assert m["per_class"]["covid"]["specificity"] == pytest.approx(3 / 4)
    assert m["per_class"]["pneumonia"]["sensitivity"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert 0 <= m["macro_auroc"] <= 1


@pytest.mark.slow
def test_small_model_learns_phantom_classes(covid_shards):
    from downstream.diagnosis import train_diagnosis

    rows = []
    res = train_diagnosis({"shards": [str(covid_shards)], "backbone": "scratch:resnet18", "image_size": 64,
                           "epochs": 6, "batch_size": 16, "lr": 3e-3, "backbone_lr": 3e-3, "affine": False,
                           "progress": False, "resplit": True}, report=rows.append)
    assert [r["epoch"] for r in rows] == list(range(1, 7)) and all("val_macro_f1" in r for r in rows)
    t = res["test"]
    assert t["n"] >= 25
    assert t["balanced_accuracy"] > 0.55, t  # chance is 1/3
    assert t["macro_auroc"] > 0.7, t


def test_cli_writes_metrics_plots_and_scorecam(covid_shards, tmp_path, repo_root):
    out = tmp_path / "dx"
    cmd = [sys.executable, "launch/downstream.py", "diagnosis", "--shards", str(covid_shards),
           "--backbone", "scratch:resnet18", "--image-size", "64", "--epochs", "1", "--batch-size", "16",
           "--mode", "partial", "--unfreeze", "2", "--balance", "weights", "--scorecam-per-class", "1",
           "--scorecam-max-channels", "32", "--out", str(out), "--wandb", "disabled", "--no-progress"]
    done = subprocess.run(cmd, cwd=repo_root, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(out / "metrics.json") in done.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["test"]["per_class"]) == set(DIAGNOSIS_CLASSES)
    for k in ("accuracy", "macro_f1", "balanced_accuracy", "macro_auroc"):
        assert 0 <= m["test"][k] <= 1
    assert (out / "confusion.png").stat().st_size > 1000
    assert len(list((out / "scorecam").glob("*.png"))) == 3
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()


def test_compare_reports_mean_sd_over_seeds(covid_shards, tmp_path, repo_root):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "launch/downstream.py", "compare", "--shards", str(covid_shards),
           "--backbones", "scratch:resnet18", "scratch:resnet34", "--names", "r18", "r34", "--seeds", "0", "1", "2",
           "--mode", "linear", "--epochs", "3", "--lr", "0.01", "--image-size", "64", "--out", str(out),
           "--wandb", "disabled", "--no-progress"]
    done = subprocess.run(cmd, cwd=repo_root, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["runs"]) == 6
    f1 = [r["macro_f1"] for r in m["runs"] if r["init"] == "r18"]
    assert m["summary"]["r18"]["macro_f1"]["mean"] == pytest.approx(np.mean(f1))
    assert m["summary"]["r18"]["macro_f1"]["sd"] == pytest.approx(np.std(f1, ddof=1))
    assert "| r34 |" in (out / "compare_table.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["diagnosis", "--backbone", "scratch:resnet18", "--out", "{tmp}/o"], "needs --shards"),
    (["diagnosis", "--shards", "{tmp}/nothing", "--backbone", "scratch:resnet18", "--out", "{tmp}/o"], "nothing"),
    (["diagnosis", "--shards", "{shards}", "--backbone", "imagenet", "--out", "{tmp}/o"], "not understood"),
])
def test_cli_user_errors_exit_2(args, message, covid_shards, tmp_path, repo_root):
    args = [a.format(tmp=tmp_path, shards=covid_shards) for a in args]
    done = subprocess.run([sys.executable, "launch/downstream.py", *args, "--wandb", "disabled"], cwd=repo_root,
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-1500:]
    assert message in done.stderr and "Traceback" not in done.stderr
