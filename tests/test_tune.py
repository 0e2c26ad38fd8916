"""Ray Tune sweeps (downstream.tuning, launch/tune.py) on ~60 phantom images at 64 px with a scratch ResNet-18.

One local Ray (2 CPUs) serves the whole module; the resume test runs launch/tune.py in a subprocess that
joins it with --address, SIGKILLs that driver once a trial has finished, then resumes.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    from shards.__main__ import main as shards_main

    root = tmp_path_factory.mktemp("tune_data")
    assert shards_main(["synth", "--out", str(root / "raw"), "--n-nih", "0", "--n-covid", "60", "--size", "64"]) == 0
    assert shards_main(["build", "covid-chestxray", "--src", str(root / "raw" / "covid-chestxray"),
                        "--out", str(root / "shards"), "--size", "64"]) == 0
    return root / "shards"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from downstream.tuning import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2, verbose=0)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _write_space(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _check_outputs(out: Path, metric: str, mode: str) -> tuple[list[dict], dict]:
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = json.loads((out / "best.json").read_text())
    assert (out / "trials.png").stat().st_size > 1000
    ok = [r for r in rows if r["status"] != "ERROR" and r[metric] != ""]
    if metric == "val_mse":  # only trials that finished every fold may win
        ok = [r for r in ok if r["stopped_early"] == "False"]
    scores = {r["trial_id"]: float(r[metric]) for r in ok}
    want = (max if mode == "max" else min)(scores.values())
    assert best["trial_id"] in scores
    assert math.isclose(scores[best["trial_id"]], want)
    assert math.isclose(best["validation"][metric], want)
    row = next(r for r in rows if r["trial_id"] == best["trial_id"])
    for k, v in best["config"].items():  # the config in best.json is that row's config
        cell = row[f"config/{k}"]
        assert cell == (",".join(map(str, v)) if isinstance(v, list) else str(v)) or math.isclose(float(cell), v)
    return rows, best


# --------------------------------------------------------------------------------------------- fast tests


def test_space_schema(tmp_path):
    from ray import tune

    from downstream.tune_space import load_space, max_value, possible_values

    path = _write_space(tmp_path / "s.yaml", "lr: {loguniform: [1.0e-4, 1.0e-2]}\nhead: {choice: [linear, mlp]}\n"
                                             "epochs: {choice: [2, 5]}\nmode: linear\n")
    space, raw = load_space(path, "diagnosis", ["dropout={uniform: [0.0, 0.5]}"])
    assert isinstance(space["lr"], tune.search.sample.Float) and space["mode"] == "linear"
    assert isinstance(space["dropout"], tune.search.sample.Float)
    assert max_value(raw, "epochs", 10) == 5 and possible_values(raw, "head", "linear") == ["linear", "mlp"]
    bad = {"typo.yaml": "lrr: 0.1\n", "dist.yaml": "lr: {normal: [0, 1]}\n", "bounds.yaml": "lr: {loguniform: [0, 1]}\n"}
    for name, text in bad.items():
        with pytest.raises(UserError):
            load_space(_write_space(tmp_path / name, text), "diagnosis")
    with pytest.raises(UserError):
        load_space(None, "severity", ["features"])
    for task in ("diagnosis", "severity"):  # the shipped spaces parse
        load_space(REPO / "launch" / "configs" / f"tune_{task}.yaml", task)


def test_cli_user_errors_and_asha_settings(tmp_path, capsys):
    import runpy

    from ray.tune.schedulers import ASHAScheduler

    from downstream.tuning import SweepSettings, _tune_config

    main = runpy.run_path(str(REPO / "launch" / "tune.py"), run_name="tune_cli")["main"]
    with pytest.raises(SystemExit) as exc:
        main(["severity", "--out", str(tmp_path / "x"), "--resume"])
    assert exc.value.code == 2 and "nothing to resume" in capsys.readouterr().err
    s = SweepSettings(task="diagnosis", shards=[], backbone="scratch", space=None, out=str(tmp_path), grace_period=2)
    cfg = _tune_config(s, {"epochs": {"choice": [3, 7]}}, "val_macro_f1", "max")
    assert isinstance(cfg.scheduler, ASHAScheduler) and cfg.metric == "val_macro_f1" and cfg.mode == "max"
    assert cfg.scheduler._max_t == 7 and min(r[0] for r in cfg.scheduler._brackets[0]._rungs) == 2  # ASHA counts epochs


# --------------------------------------------------------------------------------------------- sweeps


@pytest.mark.slow
@pytest.mark.faults
def test_severity_sweep_shared_features_failure_and_wandb(shard_dir, ray_cluster, tmp_path):
    """4 trials (2 regressors x fail; the failing two raise after their first fold) on features shared from the driver; offline W&B runs."""
    from downstream.tuning import SweepSettings, run_sweep

    space = _write_space(tmp_path / "sev.yaml", "features: pooled\nregressor: {grid: [ridge, mlp]}\n"
                                                "alpha: {loguniform: [0.1, 100.0]}\nhidden: 8\nmax_iter: 200\n"
                                                "flip: {choice: [none, hv]}\nfolds: 3\n"
                                                "fail: {grid: [false, true]}\n")
    out = tmp_path / "sev"
    s = SweepSettings(task="severity", shards=[str(shard_dir)], backbone="scratch:resnet18", space=space,
                      out=str(out), num_samples=1, scheduler="fifo", max_failures=0, wandb_mode="offline")
    result = run_sweep(s, verbose=0)
    rows, best = _check_outputs(out, "val_mse", "min")
    assert len(rows) == 4
    errored = [r for r in rows if r["status"] == "ERROR"]
    assert len(errored) == 2 and all("injected failure" in r["error"] for r in errored)
    assert all(r["iterations"] == "1" for r in errored)  # it reported once, then raised
    assert all(r["status"] == "TERMINATED" and r["iterations"] == "3" for r in rows if r not in errored)
    assert best["test"]["mse"] >= 0 and set(best["test"]) >= {"geographic_mean", "opacity_mean"}
    assert result["best"]["trial_id"] == best["trial_id"]
    for r in rows:  # one offline W&B run per trial, plus the summary run for the best trial
        assert list((out / "trials" / r["trial_id"] / "wandb").glob("offline-run-*")), r["trial_id"]
    assert list((out / "wandb").glob("offline-run-*"))


def _terminated(exp_dir: Path) -> set[str]:
    done = set()
    for f in exp_dir.glob("experiment_state-*.json"):
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        for item in data.get("trial_data", []):
            trial = json.loads(item[0] if isinstance(item, list) else item)
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


@pytest.mark.slow
@pytest.mark.faults
def test_killed_sweep_resumes_without_redoing_finished_trials(shard_dir, ray_cluster, tmp_path):
    """Also the diagnosis sweep test: partial fine-tuning and linear probes on shared features, 3 trials."""
    space = _write_space(tmp_path / "dx.yaml", "mode: {grid: [partial, linear, partial]}\nunfreeze: 1\n"
                                               "lr: {loguniform: [1.0e-3, 3.0e-2]}\nhead: {choice: [linear, mlp]}\n"
                                               "hidden: 16\ndropout: {uniform: [0.0, 0.3]}\nepochs: 3\n"
                                               "batch_size: 16\nbn_recalibrate: 0\n")
    out = tmp_path / "resume"
    cmd = [sys.executable, str(REPO / "launch" / "tune.py"), "diagnosis", "--shards", str(shard_dir),
           "--backbone", "scratch:resnet18", "--space", space, "--num-samples", "1", "--scheduler", "fifo",
           "--cpus-per-trial", "2", "--address", ray_cluster, "--out", str(out), "--verbose", "0",
           "--wandb-mode", "disabled"]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    exp = out / "ray" / "diagnosis-resume"
    deadline = time.time() + 150
    try:
        while not _terminated(exp) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finished = _terminated(exp)
    assert finished, err.decode()[-2000:]
    assert len(finished) < 3, "every trial finished before the kill; the test did not interrupt anything"
    before = {t: (out / "trials" / t / "metrics.jsonl").read_text() for t in finished}
    assert not (out / "best.json").exists()

    res = subprocess.run([sys.executable, str(REPO / "launch" / "tune.py"), "diagnosis", "--out", str(out),
                          "--resume", "--address", ray_cluster, "--verbose", "0"], check=False, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "best.json" in res.stdout
    rows, best = _check_outputs(out, "val_macro_f1", "max")
    assert len(rows) == 3 and all(r["status"] == "TERMINATED" and r["iterations"] == "3" for r in rows)
    for t, text in before.items():  # finished trials were not run again
        assert (out / "trials" / t / "metrics.jsonl").read_text() == text
    assert 0 <= best["test"]["macro_f1"] <= 1 and sum(map(sum, best["test"]["confusion"])) == best["test"]["n"]
    assert not list(out.rglob("offline-run-*"))  # disabled W&B writes nothing


# ------------------------------------------------------------------------------ default spaces fit the backbone


def test_default_space_fits_the_backbone():
    from downstream.sweep import fit_space_to_backbone
    from downstream.tune_space import read_space

    raw = read_space(REPO / "launch" / "configs" / "tune_severity.yaml")
    named = raw["features"]["choice"]
    assert any("lung_opacity" in str(v) for v in named) and "pathologies" in named
    same, dropped = fit_space_to_backbone(raw, "severity", True, "xrv:FILE")
    assert same == raw and dropped == []
    fitted, dropped = fit_space_to_backbone(raw, "severity", False, "scratch")
    assert fitted["features"]["choice"] == ["pooled", "multiscale"]
    assert set(dropped) == set(named) - {"pooled", "multiscale"}
    assert {k: v for k, v in fitted.items() if k != "features"} == {k: v for k, v in raw.items() if k != "features"}
    with pytest.raises(UserError, match="named-output features"):
        fit_space_to_backbone({"features": "lung_opacity"}, "severity", False, "scratch")


@pytest.fixture(scope="module")
def exported_encoder(tmp_path_factory) -> str:
    import torch

    from pretrain.model import build_unet, export_encoder

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("enc") / "run"
    export_encoder(build_unet("resnet18"), run, {"encoder": "resnet18", "image_size": 64})
    return str(run / "encoder.pt")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["severity", "diagnosis"])
def test_default_spaces_run_for_scratch_and_an_exported_encoder(task, shard_dir, ray_cluster, exported_encoder,
                                                               tmp_path, capsys):
    """The shipped default space, 3 trials, for a scratch backbone and for our own encoder.pt (neither has
    named outputs). CI-sized: 32 px, and a few overrides of cost-only entries (diagnosis: 1 epoch of batch 16;
severity: 2 folds, 50 MLP iterations); everything else is the shipped space."""
    import runpy

    main = runpy.run_path(str(REPO / "launch" / "tune.py"), run_name=f"default_{task}")["main"]
    for name, backbone in (("scratch", "scratch:resnet18"), ("encoder", exported_encoder)):
        out = tmp_path / f"{task}-{name}"
        argv = [task, "--shards", str(shard_dir), "--backbone", backbone, "--num-samples", "3", "--out", str(out),
                "--cpus-per-trial", "1", "--verbose", "0", "--wandb-mode", "disabled", "--device", "cpu",
                "--image-size", "32"]
        argv += ["--set", "epochs=1", "--set", "batch_size=16"] if task == "diagnosis" else \
            ["--set", "folds=2", "--set", "max_iter=50"]
        assert main(argv) == 0
        captured = capsys.readouterr()
        with open(out / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        best = json.loads((out / "best.json").read_text())
        assert len(rows) == 3 and all(r["status"] == "TERMINATED" for r in rows), rows
        assert best["test"], best
        if task == "severity":
            assert {r["config/features"] for r in rows} <= {"pooled", "multiscale"}
            assert "pathologies" in best["left_out"]["features"]
            assert "left out of the space" in captured.err + captured.out
            assert best["test"]["mse"] >= 0
        else:
            assert {r["config/mode"] for r in rows} == {"partial"} and 0 <= best["test"]["macro_f1"] <= 1
