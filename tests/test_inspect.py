"""`python -m shards inspect`: counts per split and label, and checksum verification with exit codes."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_writer import fake_build, make_fake_src

from shards.__main__ import main


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    out = root / "shards"
    fake_build(make_fake_src(root / "src", n=16, size=40), out, size=24, max_count=4, workers=1)
    return out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "copy"))


def test_prints_counts_and_passes(built, capsys):
    assert main(["inspect", str(built)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].startswith("train: ") and "val: " in out and "test: " in out
    assert "diagnosis: " in out and "findings: " in out and "skipped 1: zero bytes" in out
    assert "checksums: all" in out and "OK" in out


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x01"), "sha256 mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[:512]), "512 bytes, manifest says"),
    (lambda p: p.unlink(), "missing"),
])
def test_damaged_or_missing_shard_exits_1_naming_it(copy, capsys, damage, words):
    damage(copy / "train-000001.tar")
    assert main(["inspect", str(copy)]) == 1
    captured = capsys.readouterr()
    assert f"train-000001.tar: {words}" in captured.err and "1 of" in captured.out


def test_no_manifest_is_a_one_line_error_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "shards", "inspect", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr
