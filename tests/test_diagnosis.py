"""3-class diagnosis: label mapping, metrics, learning phantom classes, outputs, compare, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from fixtures_downstream import SIZE, diagnosis_set, phantom_shards, trained_diagnosis

from downstream.data import DIAGNOSIS_CLASSES, diagnosis_target
from downstream.metrics import classification_metrics
from runkit.errors import UserError


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
def test_small_model_learns_phantom_classes(tmp_path_factory):
    res, rows = trained_diagnosis(tmp_path_factory)
    epochs = res["config"]["epochs"]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)) and all("val_macro_f1" in r for r in rows)
    assert res["best_epoch"] == 1 + int(np.argmax([r["val_macro_f1"] for r in rows]))
    t = res["test"]
    assert t["n"] == len(res["test_index"]) >= 25
    assert set(res["counts"]) == {"train", "val", "test"} and min(res["counts"]["train"]) > 30
    assert t["balanced_accuracy"] > 0.55, t  # chance is 1/3
    assert t["macro_auroc"] > 0.75, t       # chance is 0.5


@pytest.mark.slow
def test_outputs_metrics_confusion_and_scorecam(tmp_path_factory, tmp_path):
    from downstream.diagnosis import write_outputs

    res, _ = trained_diagnosis(tmp_path_factory)
    files = write_outputs(res, res["data"], tmp_path / "dx")
    m = json.loads((tmp_path / "dx" / "metrics.json").read_text())
    assert set(m["test"]["per_class"]) == set(DIAGNOSIS_CLASSES)
    for k in ("accuracy", "macro_f1", "balanced_accuracy", "macro_auroc"):
        assert m["test"][k] == pytest.approx(res["test"][k])
    assert np.sum(m["test"]["confusion"]) == m["test"]["n"]
    assert (tmp_path / "dx" / "confusion.png").stat().st_size > 1000
    cams = sorted(p.name for p in (tmp_path / "dx" / "scorecam").glob("*.png"))
    assert len(cams) == len(files["scorecam"]) == 3  # one per class
    assert {c.split("_", 1)[0] for c in cams} == set(DIAGNOSIS_CLASSES)


def test_compare_reports_mean_sd_over_seeds(tmp_path_factory):
    from downstream.compare import compare_initialisations, table
    from downstream.data import split_indices

    data = diagnosis_set(tmp_path_factory)
    splits = split_indices(data)
    seen = []
    cfg = {"image_size": SIZE, "mode": "linear", "epochs": 3, "lr": 0.01, "progress": False}
    result = compare_initialisations(cfg, ["scratch:resnet18", "scratch:resnet34"], [0, 1, 2], data=data,
                                     splits=splits, names=["r18", "r34"],
                                     on_result=lambda n, s, r: seen.append((n, s, r["test"]["n"])))
    assert len(result["runs"]) == 6 and [s[:2] for s in seen][:3] == [("r18", 0), ("r18", 1), ("r18", 2)]
    assert all(n == len(splits["test"]) for *_, n in seen)
    f1 = [r["macro_f1"] for r in result["runs"] if r["init"] == "r18"]
    assert result["summary"]["r18"]["macro_f1"]["mean"] == pytest.approx(np.mean(f1))
    assert result["summary"]["r18"]["macro_f1"]["sd"] == pytest.approx(np.std(f1, ddof=1))
    assert "| r34 |" in table(result) and "±" in table(result)


def test_user_errors_in_process(tmp_path_factory, tmp_path):
    from downstream.cli import parse, run

    shards = phantom_shards(tmp_path_factory)[1]
    (tmp_path / "empty").mkdir()
    cases = [
        (["diagnosis", "--shards", str(tmp_path / "empty"), "--backbone", "scratch:resnet18"], "no \\*.tar"),
        (["diagnosis", "--shards", str(shards), "--backbone", "imagenet"], "not understood"),
        (["compare", "--shards", str(shards), "--backbones", "scratch:resnet18", "scratch:resnet34",
          "--names", "a b", "a_b"], "not distinct"),
        (["compare", "--shards", str(shards), "--backbones", "scratch:resnet18", "--names", "a", "b"], "--names"),
        (["diagnosis", "--shards", str(shards), "--mode", "linear", "--backbone", "scratch:resnet18",
          "--image-size", "32", "--epochs", "0"], "epochs"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            run(parse([*argv, "--out", str(tmp_path / "o"), "--wandb", "disabled", "--no-progress"]))


def test_cli_user_error_exits_2(tmp_path, repo_root):
    done = subprocess.run([sys.executable, "launch/downstream.py", "diagnosis", "--backbone", "scratch:resnet18",
                           "--out", str(tmp_path / "o"), "--wandb", "disabled"], cwd=repo_root, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-1500:]
    assert "needs --shards" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_cli_compare_writes_table_confusion_and_scorecam(tmp_path_factory, tmp_path, repo_root):
    """The package's one end-to-end CLI run: compare, with the first seed's figures per initialisation."""
    shards = phantom_shards(tmp_path_factory)[1]
    out = tmp_path / "cmp"
    cmd = [sys.executable, "launch/downstream.py", "compare", "--shards", str(shards),
           "--backbones", "scratch:resnet18", "scratch:resnet18", "--names", "ssl (genesis)", "scratch",
           "--seeds", "0", "1", "--mode", "linear", "--epochs", "2", "--lr", "0.01", "--image-size", str(SIZE),
           "--scorecam-per-class", "1", "--scorecam-max-channels", "16",
           "--out", str(out), "--wandb", "disabled", "--no-progress"]
    done = subprocess.run(cmd, cwd=repo_root, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(out / "metrics.json") in done.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["runs"]) == 4 and set(m["summary"]) == {"ssl (genesis)", "scratch"}
    assert "| scratch |" in (out / "compare_table.md").read_text()
    for label in ("ssl_genesis", "scratch"):
        assert (out / f"confusion_{label}.png").stat().st_size > 1000
        cams = list((out / "scorecam" / label).glob("*.png"))
        assert len(cams) == 3 and {p.name.split("_", 1)[0] for p in cams} == set(DIAGNOSIS_CLASSES)
        assert m["files"][f"confusion_{label}"] == str(out / f"confusion_{label}.png")
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
