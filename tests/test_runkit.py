"""runkit: layered config, secret scrubbing, atomic writes, one-line user errors, JSON-lines tracking."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runkit.atomic import atomic_write_bytes, atomic_write_json
from runkit.config import save_resolved, scrub_secrets
from runkit.errors import UserError, exit_on_user_error
from runkit.tracking import Tracker, default_wandb_mode, read_jsonl
from runkit.typed import parse_layered

REPO = Path(__file__).resolve().parents[1]


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--name", default="code")
    return p


def test_defaults_then_yaml_then_cli(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("lr: 0.5\nbatch-size: 32\n")
    args = parse_layered(_parser(), ["--config", str(cfg), "--batch-size", "4"])
    assert args.lr == 0.5          # YAML beats the default
    assert args.batch_size == 4    # CLI beats YAML
    assert args.name == "code"     # untouched default


def test_unknown_yaml_key_and_bad_yaml_are_user_errors(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("lrr: 0.5\n")
    with pytest.raises(UserError, match="unknown key 'lrr'"):
        parse_layered(_parser(), ["--config", str(bad_key)])
    broken = tmp_path / "b.yaml"
    broken.write_text("lr: [0.5\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_layered(_parser(), ["--config", str(broken)])
    with pytest.raises(UserError, match="does not exist"):
        parse_layered(_parser(), ["--config", str(tmp_path / "missing.yaml")])


def test_saved_config_has_git_sha_and_no_secrets(tmp_path):
    ns = argparse.Namespace(lr=0.1, out=tmp_path, wandb_api_key="abc123", nested={"token": "t", "ok": 1})
    path = save_resolved(ns, tmp_path)
    data = yaml.safe_load(path.read_text())
    assert data["lr"] == 0.1 and data["out"] == str(tmp_path)
    assert "git_sha" in data
    assert "abc123" not in path.read_text() and "<redacted>" in path.read_text()
    assert data["nested"] == {"token": "<redacted>", "ok": 1}
    assert scrub_secrets({"password": "x", "keep": [{"secret": 1}]}) == {"password": "<redacted>",
                                                                          "keep": [{"secret": "<redacted>"}]}


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    class Boom(Exception):
        pass

    def failing(f):
        f.write(b"partial")
        raise Boom

    from runkit.atomic import atomic_write

    with pytest.raises(Boom):
        atomic_write(target, failing)
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_user_error_exits_2_with_one_line(capsys):
    @exit_on_user_error
    def main():
        raise UserError("--out is required")

    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out is required" in err and "Traceback" not in err


def test_tracker_jsonl_and_torn_line(tmp_path):
    with Tracker(tmp_path, {"a": 1}, mode="disabled") as t:
        t.log({"loss": 0.5}, step=1)
        t.log({"loss": float("nan")}, step=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')  # a kill mid-write
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 0.5 and rows[1]["loss"] == "nan"
    assert not (tmp_path / "wandb").exists()


def test_wandb_mode_needs_no_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert default_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert default_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert default_wandb_mode() == "disabled"


def test_offline_wandb_writes_run_folder_without_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_SILENT"] = "true"
    code = ("from runkit.tracking import Tracker\n"
            f"t = Tracker({str(tmp_path)!r}, {{'lr': 1, 'api_key': 'SECRET-XYZ'}}, name='t')\n"
            "t.log({'loss': 1.0}, step=1); t.finish()\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=120)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "an offline W&B run folder should exist"
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.stat().st_size < 5_000_000:
            assert b"SECRET-XYZ" not in p.read_bytes(), p


def test_every_torch_load_uses_weights_only():
    """Checkpoints from outside must never run code: every torch.load in the packages says weights_only=True."""
    offenders = []
    for pkg in ("shards", "pretrain", "downstream", "runkit", "launch"):
        for py in (REPO / pkg).rglob("*.py"):
            for m in re.finditer(r"torch\.load\(([^)]*)\)", py.read_text()):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{py.relative_to(REPO)}: {m.group(0)[:80]}")
    assert not offenders, offenders


def test_keep_freed_memory_raises_glibc_thresholds_once():
    import platform

    from runkit.allocator import keep_freed_memory

    took = keep_freed_memory()
    assert keep_freed_memory() is took                      # applied once per process
    if platform.libc_ver()[0] == "glibc":
        assert took is True


@pytest.mark.slow
def test_restart_reuses_the_run_folders_wandb_run(tmp_path, monkeypatch):
    """A requeued job is one W&B run: the id is made once per run folder and reused by every restart."""
    from runkit.tracking import RUN_ID_FILE, Tracker, persistent_run_id

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for _ in range(2):  # first start, then the restart
        rid = persistent_run_id(tmp_path)
        ids.append(rid)
        t = Tracker(tmp_path, config={"a": 1}, mode="offline", resume_id=rid)
        assert t.wandb_run.id == rid
        t.log({"loss": 1.0}, step=len(ids))
        t.finish()
    assert ids[0] == ids[1] == (tmp_path / RUN_ID_FILE).read_text().strip()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(ids[0]) for name in runs), runs
