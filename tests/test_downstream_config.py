"""Typed configs: flags, YAML keys and space keys derive from one dataclass per task, and a bad YAML value
exits 2 with one line for every task (launch/downstream.py's five, launch/tune.py's settings and spaces)."""
from __future__ import annotations

import argparse
import dataclasses
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from downstream.config import (
    CompareConfig,
    DiagnosisConfig,
    NIH14Config,
    SeverityConfig,
    SeverityProtocolConfig,
    SweepConfig,
    trial_keys,
)
from runkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
_MAINS: dict[str, object] = {}


def _main(script: str):
    if script not in _MAINS:
        _MAINS[script] = runpy.run_path(str(REPO / "launch" / script), run_name=f"cfg_{script}")["main"]
    return _MAINS[script]


def _exit_2_one_line(capsys, script: str, argv: list[str], needle: str) -> None:
    with pytest.raises(SystemExit) as exc:
        _main(script)(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err


# One bad value per task and per kind of check (type, choice, range, list item, the device spec).
BAD_YAML = [
    ("downstream.py", "diagnosis", "lr: fast\n", "lr must be a number"),
    ("downstream.py", "diagnosis", "epochs: 0\n", "epochs must be >= 1"),
    ("downstream.py", "diagnosis", "wandb: bogus\n", "wandb must be one of"),
    ("downstream.py", "diagnosis", "hflip: maybe\n", "hflip must be true or false"),
    ("downstream.py", "diagnosis", "device: gpu\n", "device must be auto, cpu, cuda"),
    ("downstream.py", "nih14", "balance: sampler\n", "balance must be one of weights, none"),
    ("downstream.py", "nih14", "dropout: 2.0\n", "dropout must be <= 0.95"),
    ("downstream.py", "compare", "seeds: [0, one]\n", "seeds must be an integer"),
    ("downstream.py", "severity", "regressor: svm\n", "regressor must be one of linear, ridge, mlp"),
    ("downstream.py", "severity", "alpha: [1.0, -1.0]\n", "alpha must be >= 0.0"),
    ("downstream.py", "severity", "targets: [geographic_mean, bogus]\n", "targets must be one of"),
    ("downstream.py", "severity", "flip: diagonal\n", "flip must be one of"),
    ("downstream.py", "severity-protocol", "cohen_repeats: 0\n", "cohen_repeats must be >= 1"),
    ("downstream.py", "severity-protocol", "typo_key: 1\n", "unknown key 'typo_key'"),
    ("tune.py", "severity", "num_samples: 0\n", "num_samples must be >= 1"),
    ("tune.py", "diagnosis", "wandb_mode: bogus\n", "wandb_mode must be one of"),
    ("tune.py", "severity", "gpus_per_trial: lots\n", "gpus_per_trial must be a number"),
]


@pytest.mark.parametrize("script,task,text,needle", BAD_YAML, ids=[f"{t}-{x.split(':')[0]}" for _, t, x, _ in BAD_YAML])
def test_bad_yaml_value_exits_2_with_one_line(tmp_path, capsys, script, task, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    _exit_2_one_line(capsys, script, [task, "--config", str(cfg), "--out", str(tmp_path / "o")], needle)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing ran


BAD_SPACES = [
    ("diagnosis", "mode: sideways\n", "mode must be one of"),
    ("diagnosis", "lr: {loguniform: [1.0e-4, 10.0]}\nmode: linear\n", None),  # in range: accepted
    ("diagnosis", "dropout: {uniform: [0.0, 3.0]}\n", "dropout must be <= 0.95"),
    ("diagnosis", "unfreeze: {randint: [-2, 3]}\n", "unfreeze must be >= 0"),
    ("severity", "flip: {choice: [none, diagonal]}\n", "flip must be one of"),
    ("severity", "folds: 1\n", "folds must be >= 2"),
    ("severity", "device: cuda\n", "unknown severity option 'device'"),  # infrastructure: not a space key
]


@pytest.mark.parametrize("task,text,needle", BAD_SPACES)
def test_space_values_are_validated_like_flags(tmp_path, task, text, needle):
    from downstream.tune_space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(text)
    if needle is None:
        load_space(path, task)
        return
    with pytest.raises(UserError, match=needle):
        load_space(path, task)


def test_flags_yaml_and_space_keys_derive_from_the_dataclasses():
    from downstream.cli import CONFIGS, build_parser
    from downstream.tune_space import TASK_KEYS

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for task, cls in CONFIGS.items():
        dests = {a.dest for a in sub[task]._actions}
        fields = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
        assert fields <= dests, (task, fields - dests)
        assert dests - fields <= {"help", "config", "out", "wandb", "wandb_project"}, (task, dests - fields)
    assert set(TASK_KEYS["diagnosis"]) == set(DiagnosisConfig.tunable_keys()) | {"fail"}
    assert set(TASK_KEYS["severity"]) == set(trial_keys("severity"))
    # one severity vocabulary: the CLI and a trial take the same keys
    assert {"alpha", "flip", "repeats", "folds", "inner_folds"} <= set(SeverityConfig.field_map())
    assert not {"alphas", "train_flips"} & {a.dest for a in sub["severity"]._actions}
    tune_parser = _tune_parser()
    assert {f.name for f in dataclasses.fields(SweepConfig) if f.metadata.get("cli", True)} <= \
        {a.dest for a in tune_parser._actions}


def _tune_parser():
    return runpy.run_path(str(REPO / "launch" / "tune.py"), run_name="cfg_parser")["build_parser"]()


def test_defaults_then_yaml_then_flags(tmp_path):
    from downstream.cli import _config, parse

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.05\nepochs: 3\nvflip: true\nshards: some/dir\n")
    args = parse(["diagnosis", "--config", str(cfg), "--epochs", "7", "--out", str(tmp_path / "o"), "--device", "cpu"])
    c = _config(args)
    assert (c["lr"], c["epochs"], c["vflip"], c["shards"], c["device"]) == (0.05, 7, True, ["some/dir"], "cpu")
    assert c["mode"] == DiagnosisConfig().mode  # untouched: the dataclass default
    nih = NIH14Config.from_dict({})
    assert nih.balance == "none" and nih.stream == "on"
    with pytest.raises(UserError, match="linear"):
        NIH14Config.from_dict({"head": "mlp"})
    assert CompareConfig.from_dict({"seeds": 4}).seeds == [4]
    assert SeverityProtocolConfig.from_dict({"four": "a,b"}).four == ["a", "b"]


def test_typed_parse_layered_serves_a_plain_argparse_parser(tmp_path):
    """What pretrain's CLI gets by importing runkit.typed.parse_layered instead of runkit.config's."""
    from runkit.typed import parse_layered

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--wandb-mode", choices=("online", "offline", "disabled"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-shards", nargs="+")
    p.add_argument("--resume", action="store_true")
    good = tmp_path / "good.yaml"
    good.write_text("wandb_mode: offline\nlr: 1.0e-2\ntrain-shards: [a, b]\nresume: true\n")
    ns = parse_layered(p, ["--config", str(good)])
    assert (ns.wandb_mode, ns.lr, ns.train_shards, ns.resume) == ("offline", 0.01, ["a", "b"], True)
    for text, needle in (("wandb_mode: bogus\n", "wandb_mode must be one of"), ("lr: [1, 2]\n", "takes one value"),
                         ("lr: fast\n", "invalid value"), ("resume: 1\n", "true or false"), ("nope: 1\n", "unknown")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(UserError, match=needle):
            parse_layered(p, ["--config", str(bad)])


def test_real_cli_bad_yaml_exit_code(tmp_path, repo_root):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("wandb: bogus\n")
    done = subprocess.run([sys.executable, "launch/downstream.py", "severity", "--config", str(cfg),
                           "--out", str(tmp_path / "o")], cwd=repo_root, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_tune_config_yaml_sets_sweep_fields(tmp_path):
    from runkit.typed import parse_layered

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("num_samples: 3\nscheduler: fifo\ngpus_per_trial: 0.5\nshards: [a, b]\n")
    ns = parse_layered(_tune_parser(), ["severity", "--config", str(cfg), "--out", "o", "--num-samples", "5"])
    s = SweepConfig.from_dict({k: v for k, v in vars(ns).items() if k in SweepConfig.field_map()}, "tune")
    assert (s.num_samples, s.scheduler, s.gpus_per_trial, s.shards, s.task) == (5, "fifo", 0.5, ["a", "b"], "severity")
