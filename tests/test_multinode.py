"""Two nodes of one rank each, on one machine, started by the shipped SLURM script itself.

`launch/configs/pretrain.slurm` runs as it would under sbatch; only `srun` and `scontrol` are stand-ins
(on PATH): `scontrol show hostnames` names two hosts, and `srun` starts the script's command once per node
with SLURM_NODEID set, each in its own process group, and, as `--kill-on-bad-exit=1` asks, kills the other
nodes when one exits non-zero. Each node's `deepspeed --no_ssh --node_rank i` launcher starts one CPU rank;
they meet over gloo at 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_pretrain import REPO, free_port, make_shards, run_env

from pretrain import checkpoint as ckpt
from runkit.tracking import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.faults]

FAKE_SRUN = r'''#!/usr/bin/env python3
"""srun stand-in: run `bash -c CMD` once per node (SLURM_NNODES), each in its own session."""
import os, signal, subprocess, sys, time
argv = sys.argv[1:]
kill_on_bad = "--kill-on-bad-exit=1" in argv
while argv and argv[0].startswith("--"):
    argv.pop(0)
n = int(os.environ["SLURM_NNODES"])
procs = []
for i in range(n):
    env = dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURM_LOCALID="0")
    procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
    with open(os.path.join(os.environ["FAKE_SLURM_DIR"], f"node{i}.pid"), "w") as f:
        f.write(str(procs[-1].pid))
rc = 0
while any(p.poll() is None for p in procs):
    bad = [p for p in procs if p.poll() not in (None, 0)]
    if bad and kill_on_bad:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    time.sleep(0.2)
sys.exit(max(abs(p.returncode) for p in procs))
'''

FAKE_SCONTROL = '''#!/bin/sh
# scontrol stand-in: `scontrol show hostnames LIST` -> two names of this machine
printf '127.0.0.1\\nlocalhost\\n'
'''


def _slurm_env(tmp: Path, shards: Path, out: Path, dbg: Path, port: int) -> dict:
    fake = tmp / "fake-slurm"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text(FAKE_SCONTROL)
    for f in fake.iterdir():
        f.chmod(0o755)
    env = run_env()
    env.update(PATH=f"{fake}:{env['PATH']}", FAKE_SLURM_DIR=str(fake), SLURM_SUBMIT_DIR=str(REPO),
               SLURM_NNODES="2", SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_ID="4242", GPUS_PER_NODE="1",
               MASTER_PORT=str(port), RUN=str(out), SHARDS=str(shards), DS_CONFIG="launch/configs/ds_cpu.json",
               ENCODER="resnet18", IMAGE_SIZE="64", BATCH_SIZE="4", MAX_STEPS="6", CHECKPOINT_EVERY="2",
               VAL_EVERY="100", EPOCH_SIZE="64", WANDB_MODE="disabled",
               EXTRA_ARGS=f"--num-workers 1 --shuffle-buffer 16 --lr 0.3 --warmup-steps 2 --log-every 1 "
                          f"--debug-keys {dbg} --debug-pause-at 3@1")
    return env


def _paused(dbg: Path, rank: int) -> list[str]:
    path = dbg / f"paused_rank{rank}.txt"
    return path.read_text().split() if path.exists() else []


def _steps(path: Path) -> dict[int, str]:
    rows = (line.split() for line in path.read_text().splitlines()) if path.exists() else []
    return {int(r[0]): r[1] for r in rows if len(r) == 2}


def test_two_nodes_one_rank_each_kill_one_node_then_resume_on_both(tmp_path):
    shards = tmp_path / "shards"
    make_shards(shards)
    shutil.copy(shards / "train-000007.tar", shards / "test-000000.tar")  # the script reads train + test
    out, dbg = tmp_path / "run", tmp_path / "debug"
    script = ["bash", str(REPO / "launch/configs/pretrain.slurm")]

    env = _slurm_env(tmp_path, shards, out, dbg, free_port())
    log = tmp_path / "first.log"  # a file, not a pipe: nobody reads a pipe while the test waits
    job = subprocess.Popen(script, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        end = time.time() + 300
        # rank 1 stops after step 3 (a hook: --debug-pause-at), so the kill lands there on any machine;
        # rank 0 goes on into step 4 and waits for rank 1 in its gradient all-reduce
        while "3@1" not in _paused(dbg, 1):
            if job.poll() is not None:
                pytest.fail(f"the 2-node job exited ({job.returncode}) before step 3:\n{log.read_text()[-4000:]}")
            if time.time() > end:
                pytest.fail("timed out waiting for the 2-node job to reach step 3")
            time.sleep(0.2)
        node1 = int((tmp_path / "fake-slurm" / "node1.pid").read_text())
        os.killpg(node1, signal.SIGKILL)  # node 1 dies: its launcher and its rank
        try:
            job.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("node 0 hung after node 1 was killed")
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        for f in (tmp_path / "fake-slurm").glob("node*.pid"):
            try:
                os.killpg(int(f.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    # the nodes agreed on one world of 2 ranks, one per node
    assert ckpt.verify(out / "checkpoints", ckpt.tag_for(2))["world_size"] == 2
    resume = ckpt.latest_complete(out / "checkpoints")[0]
    assert resume == 2, log.read_text()[-3000:]
    n_before = [len(_steps(dbg / f"params_rank{k}.txt")) for k in range(2)]

    # the same script again: both nodes resume from the last complete checkpoint and finish
    r = subprocess.run(script, cwd=REPO, env=_slurm_env(tmp_path, shards, out, dbg, free_port()), check=False,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / ckpt.tag_for(resume)} at step {resume}" in r.stdout
    assert "pretrain: done at step 6;" in r.stdout
    after = []
    for k in range(2):
        lines = (dbg / f"params_rank{k}.txt").read_text().splitlines()
        after.append(dict(line.split() for line in lines[n_before[k]:] if len(line.split()) == 2))
    assert sorted(map(int, after[0])) == list(range(resume + 1, 7))
    assert after[0] == after[1]  # identical parameters on both nodes after every resumed step
    rows = [row for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert rows[-1]["step"] == 6 and rows[-1]["samples_seen"] == 6 * 8 and rows[-1]["effective_batch"] == 8
    assert ckpt.verify(out / "checkpoints", ckpt.tag_for(6))["world_size"] == 2
    assert json.loads((out / "last" / "encoder.json").read_text())["world_size"] == 2
