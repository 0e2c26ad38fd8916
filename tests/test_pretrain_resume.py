"""Faults during pretraining: kill -9 of a rank and resume, a half-written checkpoint, a full disk, NaN.

Each case launches the real entry point in subprocesses, as a user would, and checks what survives.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from test_pretrain import DEEPSPEED, PY, REPO, base_cmd, free_port, make_shards, run_env

from pretrain import checkpoint as ckpt
from runkit.tracking import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _wait_for(pred, timeout: float, proc=None, what=""):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run exited ({proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.faults_heavy  # two 2-rank launches: 1-2.5 min on 2 shared cores; `make test-faults` runs it
def test_kill_one_rank_then_resume_from_last_complete_checkpoint(tmp_path):
    shards = make_shards(tmp_path / "shards")
    out, dbg = tmp_path / "run", tmp_path / "debug"
    args = base_cmd(shards, out, "--max-steps", "8", "--checkpoint-every", "3", "--keep-last", "2",
                    "--val-every", "100", "--debug-keys", str(dbg), "--debug-step-sleep", "0.3")
    port = str(free_port())
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", port, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _wait_for(lambda: ckpt.verify(out / "checkpoints", ckpt.tag_for(3)) is not None, 300, proc,
                  "the step-3 checkpoint")
        os.kill(int((dbg / "pid_rank1.txt").read_text()), signal.SIGKILL)
        try:  # the launcher must notice the dead rank and stop the other one, not hang in a collective
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the job hung after one rank was killed")
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    resume_step = ckpt.latest_complete(out / "checkpoints")[0]
    assert resume_step in (3, 6)
    # What a kill during checkpoint saving leaves: a newer tag with a partial file and `latest` pointing at it.
    torn = out / "checkpoints" / ckpt.tag_for(resume_step + 1)
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 torn")
    (out / "checkpoints" / "latest").write_text(torn.name)
    params_before = dict(line.split() for line in (dbg / "params_rank0.txt").read_text().splitlines())

    r = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *args], cwd=REPO,
                       env=run_env(), check=False, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / ckpt.tag_for(resume_step)} at step {resume_step}" in r.stdout
    # steps after the restart continue from the checkpoint, on both ranks, with identical parameters
    lines = [(dbg / f"params_rank{k}.txt").read_text().splitlines() for k in range(2)]
    after = [dict(line.split() for line in ls[len(params_before) if k == 0 else 0:]) for k, ls in enumerate(lines)]
    assert sorted(map(int, after[0])) == list(range(resume_step + 1, 9))
    assert all(after[1][s] == v for s, v in after[0].items())
    rows = read_jsonl(out / "metrics.jsonl")
    last = [r for r in rows if "loss" in r][-1]
    assert last["step"] == 8 and last["samples_seen"] == 8 * 8
    assert ckpt.latest_complete(out / "checkpoints")[0] == 8
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert tags == [ckpt.tag_for(6), ckpt.tag_for(8)]  # keep-last 2; the torn tag was pruned
    assert json.loads((out / "last" / "encoder.json").read_text())["step"] == 8


def test_full_disk_then_nan_then_resume(tmp_path):
    """Single process: a checkpoint fails with ENOSPC (the previous stays usable), then a NaN stops the run."""
    shards = make_shards(tmp_path / "shards", n_train_shards=2)
    out = tmp_path / "run"
    args = base_cmd(shards, out, "--max-steps", "6", "--checkpoint-every", "2", "--val-every", "100")
    r = subprocess.run([PY, *args, "--debug-enospc-at-step", "4", "--debug-nan-at-step", "5"], cwd=REPO,
                       env=run_env(), check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    assert "checkpoint step_00000004 failed" in r.stderr and "No space left on device" in r.stderr
    assert "the last complete one is step_00000002" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain: error: non-finite loss at step 5") and "nan_dump.json" in last
    dump = json.loads((out / "nan_dump.json").read_text())
    assert dump["step"] == 5 and dump["loss"] == "nan" and len(dump["keys"]) == 4
    assert dump["input"]["shape"] == [4, 1, 64, 64] and dump["input"]["nonfinite"] == 0
    assert not (out / "checkpoints" / ckpt.tag_for(4)).exists()
    assert ckpt.latest_complete(out / "checkpoints")[0] == 2

    r = subprocess.run([PY, *args], cwd=REPO, env=run_env(), check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "at step 2" in r.stdout
    assert ckpt.latest_complete(out / "checkpoints")[0] == 6
