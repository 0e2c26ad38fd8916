"""runkit.tracking: W&B goes online only when asked, images only online, metrics.jsonl survives a kill mid-write.

No test here reaches the network: `wandb.init` is replaced by a recorder of what it was asked (the mode,
the config, the command line it would record). The real offline path is run by test_redaction.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runkit.tracking import Tracker, cut_torn_tail, default_wandb_mode, read_jsonl

REPO = Path(__file__).resolve().parents[1]


class _RecordedRun:
    id = "recorded"

    def __init__(self):
        self.logged: list[dict] = []
        self.summary: dict = {}

    def log(self, values, step=None):
        self.logged.append(values)

    def finish(self):
        pass


@pytest.fixture
def wandb_init(monkeypatch, tmp_path):
    """wandb.init records its arguments (and sys.argv at that moment); HOME holds a `wandb login` in .netrc."""
    import wandb

    calls = []

    def init(**kwargs):
        run = _RecordedRun()
        calls.append({**kwargs, "argv": list(sys.argv), "run": run})
        return run

    monkeypatch.setattr(wandb, "init", init)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("HOME", str(home))
    for var in ("NETRC", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    return calls


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("L", (8, 8), 128).save(path)
    return path


def test_wandb_online_only_when_asked_and_images_only_online(wandb_init, tmp_path, monkeypatch, capsys):
    img = _png(tmp_path / "grid.png")

    def start(name, **kw):
        t = Tracker(tmp_path / name, {"lr": 1}, **kw)
        t.log_image("val/reconstructions", img, step=1)
        t.finish()
        call = wandb_init[-1]
        return call["mode"], [k for d in call["run"].logged for k in d]

    # a `wandb login` in ~/.netrc is no request: offline, and no image in the offline run
    assert default_wandb_mode() == "offline"
    assert start("netrc") == ("offline", [])
    # an explicit --wandb-mode online uses that login
    assert start("explicit", mode="online") == ("online", ["val/reconstructions"])
    # WANDB_MODE=online asks too
    monkeypatch.setenv("WANDB_MODE", "online")
    assert start("env-mode") == ("online", ["val/reconstructions"])
    monkeypatch.delenv("WANDB_MODE")
    # WANDB_API_KEY in the environment is the default request
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert default_wandb_mode() == "online"
    assert start("key") == ("online", ["val/reconstructions"])
    # online asked for with no login at all: offline with one line, never a prompt or a wait
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "home" / ".netrc").unlink()
    capsys.readouterr()
    assert start("nologin", mode="online") == ("offline", [])
    assert "logging offline instead" in capsys.readouterr().err
    # disabled: wandb.init is not called at all
    n = len(wandb_init)
    Tracker(tmp_path / "off", mode="disabled").finish()
    assert len(wandb_init) == n


def test_what_wandb_is_given_is_redacted(wandb_init, tmp_path, monkeypatch):
    secret = "hunter2-Zq81"
    url = f"https://alice:{secret}@data.example.org/train-{{000..009}}.tar?X-Amz-Signature={secret}x"
    argv = ["launch/pretrain.py", "--train-shards", url, "--val-shards",
            f"pipe:curl -s -H 'Authorization: Bearer {secret}y' https://data.example.org/val.tar"]
    monkeypatch.setattr(sys, "argv", list(argv))
    t = Tracker(tmp_path / "r", {"train_shards": url, "nested": {"urls": [url]}, "api_key": secret}, mode="offline")
    t.log({"loss": 0.5, "note": url}, step=1)
    t.summary({"last_url": url})
    t.finish()
    call = wandb_init[-1]
    sent = json.dumps([call["config"], call["argv"], call["run"].logged, call["run"].summary])
    assert secret not in sent, sent
    assert call["config"]["train_shards"] == "https://<redacted>@data.example.org/train-{000..009}.tar" \
                                             "?X-Amz-Signature=<redacted>"
    assert call["argv"][4] == "pipe:curl -s -H 'Authorization: <redacted>' https://data.example.org/val.tar"
    assert sys.argv == argv  # restored after init
    assert secret not in (tmp_path / "r" / "metrics.jsonl").read_text()


def test_cut_torn_tail(tmp_path):
    p = tmp_path / "m.jsonl"
    cut_torn_tail(p)                                   # no file: nothing to do
    p.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    cut_torn_tail(p)
    assert p.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    cut_torn_tail(p)                                   # a clean file is left alone
    assert p.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    p.write_bytes(b'{"step": 1}\n{"step": 2}')         # a whole row without its newline is kept
    cut_torn_tail(p)
    assert p.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    p.write_bytes(b'{"st' + b"x" * 200_000)             # a torn first line, longer than one read block
    cut_torn_tail(p)
    assert p.read_bytes() == b""


# A run that logs two rows, then a third of 200 kB. RLIMIT_FSIZE lets the file grow only 1000 bytes past
# the two rows, and SIGXFSZ (which CPython ignores; its default kills) is restored: the kernel kills the
# process inside the write of row 3, after exactly 1000 of its bytes are on disk, whatever the machine's speed.
_KILLED_MID_WRITE = r"""
import os, resource, signal, sys
from runkit.tracking import Tracker

out = sys.argv[1]
t = Tracker(out, mode="disabled")
t.log({"loss": 1.0}, step=1)
t.log({"loss": 0.9}, step=2)
size = os.path.getsize(os.path.join(out, "metrics.jsonl"))
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, resource.RLIM_INFINITY))
t.log({"loss": 0.8, "blob": "x" * 200_000}, step=3)
print("not killed", flush=True)
"""


def test_kill_during_a_metrics_write_then_the_next_run_appends_whole_rows(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(out)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == -signal.SIGXFSZ, (done.returncode, done.stdout, done.stderr[-2000:])
    raw = (out / "metrics.jsonl").read_bytes()
    lines = raw.split(b"\n")
    assert len(lines) == 3 and len(lines[2]) == 1000 and not raw.endswith(b"\n")  # torn inside row 3
    # the next run (a restart) appends its rows
    with Tracker(out, mode="disabled") as t:
        t.log({"loss": 0.7}, step=3)
        t.log({"loss": 0.6}, step=4)
    text = (out / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]  # every line is whole JSON: nothing joined
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.9), (3, 0.7), (4, 0.6)]
    assert read_jsonl(out / "metrics.jsonl") == rows
