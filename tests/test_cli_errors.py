"""Bad configuration and CLI use: one clear line naming the problem, exit code 2, no traceback.

The cases run in-process through each script's decorated `main` (fast); one per entry point also runs as a
real subprocess, so the exit code and stderr are exactly what a user sees.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.faults  # `make test-faults` runs these with the heavy cases


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _shards_main(argv):
    from shards.__main__ import main

    return main(argv)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "broken.yaml").write_text("lr: [0.1\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "ds_bad.json").write_text(json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2,
                                               "gradient_accumulation_steps": 1}))
    (d / "ds_broken.json").write_text("{not json")
    (d / "nih").mkdir()
    (d / "nih" / "Data_Entry_2017_v2020.csv").write_text("Image Index,Patient ID\n00000001_000.png,1\n")
    (d / "shard.tar").write_bytes(b"")
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    return d


def cases(d: Path):
    out = str(d / "out")
    pre = ["--out", out, "--train-shards", str(d / "shard.tar")]
    return [
        # (entry point, argv, words the one-line message must contain)
        ("shards", ["build", "nih", "--src", str(d / "missing"), "--out", out], "missing"),
        ("shards", ["build", "nih", "--src", str(d / "nih"), "--out", out], "Finding Labels"),
        ("shards", ["inspect", str(d / "missing")], "missing"),
        ("pretrain", ["--out", out, "--train-shards", str(d / "nothing-*.tar")], "nothing-*.tar"),
        ("pretrain", pre + ["--image-size", "100"], "multiple of 32"),
        ("pretrain", pre + ["--encoder", "nosuchnet"], "nosuchnet"),
        ("pretrain", pre + ["--config", str(d / "broken.yaml")], "YAML"),
        ("pretrain", pre + ["--config", str(d / "list.yaml")], "mapping"),
        ("pretrain", pre + ["--deepspeed_config", str(d / "ds_bad.json")], "train_batch_size"),
        ("pretrain", pre + ["--deepspeed_config", str(d / "ds_broken.json")], "JSON"),
        ("pretrain", pre + ["--deepspeed_config", str(d / "missing.json")], "missing.json"),
        ("downstream", ["severity", "--shards", str(d / "nothing-*.tar"), "--out", out], "nothing-*.tar"),
        ("downstream", ["severity", "--shards", str(d / "shard.tar"), "--backbone", str(d / "missing.pt"),
                        "--out", out], "missing.pt"),
        ("downstream", ["severity", "--shards", str(d / "shard.tar"), "--backbone", f"chexnet:{d / 'garbage.pt'}",
                        "--out", out], "garbage.pt"),
        ("downstream", ["diagnosis", "--shards", str(d / "shard.tar"), "--config", str(d / "broken.yaml"),
                        "--out", out], "YAML"),
        ("tune", ["severity", "--shards", str(d / "shard.tar"), "--space", str(d / "missing.yaml"), "--out", out],
         "missing.yaml"),
    ]


def _run_inprocess(entry: str, argv):
    main = _shards_main if entry == "shards" else _script_main(entry)
    return main(argv)


@pytest.mark.parametrize("i", range(16))
def test_bad_input_is_one_line_exit_2(i, bad_files, capsys):
    entry, argv, words = cases(bad_files)[i]
    with pytest.raises(SystemExit) as exc:
        _run_inprocess(entry, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, (entry, argv, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert words.lower() in lines[0].lower(), lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("cmd", [
    ["-m", "shards", "inspect", "/nonexistent/shards"],
    ["launch/pretrain.py", "--out", "/tmp/x", "--train-shards", "/nonexistent/*.tar"],
])
def test_real_process_exit_code(cmd):
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].count("error:") == 1
