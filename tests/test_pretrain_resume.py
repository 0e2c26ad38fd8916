"""Faults during pretraining: kill -9 of the whole job (also mid-save) or of one rank, then resume; a full disk; NaN.

Each case launches the real entry point in subprocesses, as a user would, and checks what survives.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

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


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc (Linux)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _kill_job(proc: subprocess.Popen) -> str:
    """kill -9 the whole job: the launcher's process group (launcher, ranks, loader workers). Returns stdout."""
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    _wait_for(lambda: not _group_alive(proc.pid), 30, what="every process of the killed job to exit")
    return out


def _steps(path: Path) -> dict[int, str]:
    """step -> parameter checksum from a params_rank*.txt (a line being written is skipped)."""
    rows = (line.split() for line in path.read_text().splitlines())
    return {int(r[0]): r[1] for r in rows if len(r) == 2}


def _lines(path: Path) -> list[str]:
    """Complete lines of a file that another process appends to."""
    text = path.read_text() if path.exists() else ""
    return text[: text.rfind("\n") + 1].splitlines()


KILL_SEED = int(os.environ.get("PRETRAIN_KILL_SEED", "20261122"))


# three 2-rank launches, 2-2.5 min on 2 loaded cores: in `make test` (the kill-one-rank case below is not)
def test_kill_whole_job_at_random_step_and_mid_save_then_resume(tmp_path):
    """kill -9 of the whole job twice, then the same command finishes the run.

    1st launch: killed after a step drawn from a seeded RNG (PRETRAIN_KILL_SEED reproduces another draw).
    2nd launch: resumes, and is killed while rank 0 is inside its first checkpoint save
    (--debug-ckpt-sleep pauses after the model file, before the optimizer files, `latest` and COMPLETE.json).
    3rd launch: resumes from the same complete checkpoint as the 2nd, never from the partial one, and finishes.
    """
    n_steps, every = 6, 2
    kill_step = random.Random(KILL_SEED).randint(3, 5)
    shards = make_shards(tmp_path / "shards")
    out, dbg = tmp_path / "run", tmp_path / "debug"
    cdir = out / "checkpoints"
    args = base_cmd(shards, out, "--max-steps", str(n_steps), "--checkpoint-every", str(every), "--keep-last", "2",
                    "--val-every", "100", "--debug-keys", str(dbg), "--debug-step-sleep", "0.2",
                    "--debug-ckpt-sleep", "2.5")
    saving = dbg / "ckpt_saving_rank0.txt"

    def launch():
        return subprocess.Popen([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *args], cwd=REPO,
                                env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def resumed_line(step):
        return f"pretrain: resumed from {cdir / ckpt.tag_for(step)} at step {step} ({step * 8} samples seen)"

    # 1st launch: kill -9 of the whole job at a random step.
    proc = launch()
    try:
        _wait_for(lambda: (dbg / "params_rank0.txt").is_file()
                  and max(_steps(dbg / "params_rank0.txt"), default=0) >= kill_step, 300, proc, f"step {kill_step}")
        _kill_job(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reached = max(_steps(dbg / "params_rank0.txt"))
    resume = ckpt.latest_complete(cdir)[0]
    why = f"seed {KILL_SEED}: killed at step {kill_step} (rank 0 reached {reached}), resume from {resume}"
    # a save finishes (both barriers) before the next step starts; a kill can only tear the one at `reached`
    saved = reached // every * every
    assert resume == saved or (resume == saved - every and reached == saved), why
    partial_a = {p.name for p in (cdir / ckpt.tag_for(saved)).glob("*")} if resume < saved else set()  # torn by it

    # 2nd launch, same command: resumes, then kill -9 of the whole job in the middle of its first save.
    n_saving = len(_lines(saving))
    torn = ckpt.tag_for(resume + every)
    proc = launch()
    try:
        _wait_for(lambda: len(_lines(saving)) > n_saving, 300, proc, f"the {torn} save to start")
        assert _lines(saving)[n_saving] == torn, why
        out2 = _kill_job(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert resumed_line(resume) in out2, why + "\n" + out2[-3000:]
    files = {p.name for p in (cdir / torn).iterdir()}
    assert "mp_rank_00_model_states.pt" in files and ckpt.MARKER not in files, files
    if not partial_a:  # rank 0 was killed before writing its optimizer file
        assert not any(f.startswith("zero_pp_rank_0_") for f in files), files
    assert ckpt.verify(cdir, torn) is None and ckpt.latest_complete(cdir)[0] == resume
    assert (cdir / "latest").read_text() != torn  # DeepSpeed had not got that far
    # A kill between DeepSpeed's `latest` and COMPLETE.json leaves `latest` naming the partial tag: it is not trusted.
    (cdir / "latest").write_text(torn)
    params_b = [_steps(dbg / f"params_rank{k}.txt") for k in range(2)]
    n_params = [len((dbg / f"params_rank{k}.txt").read_text().splitlines()) for k in range(2)]
    n_rows = len(read_jsonl(out / "metrics.jsonl"))

    # 3rd launch, same command: resumes from the last complete checkpoint and finishes.
    r = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *args], cwd=REPO,
                       env=run_env(), check=False, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, why + "\n" + r.stdout[-4000:] + r.stderr[-4000:]
    assert resumed_line(resume) in r.stdout, why + "\n" + r.stdout[-3000:]
    assert "resumed from" not in r.stdout.replace(resumed_line(resume), "")
    assert f"pretrain: done at step {n_steps};" in r.stdout
    # the step counter continues from the checkpoint, on both ranks, with identical parameters after every step
    after = [dict(line.split() for line in (dbg / f"params_rank{k}.txt").read_text().splitlines()[n_params[k]:])
             for k in range(2)]
    assert sorted(map(int, after[0])) == list(range(resume + 1, n_steps + 1)), why
    assert after[0] == after[1]
    # the 2nd and 3rd launches restarted from the same state with the same data seed: same parameters
    assert all(after[0][str(s)] == params_b[0][s] for s in range(resume + 1, resume + every + 1)), why
    rows = [row for row in read_jsonl(out / "metrics.jsonl")[n_rows:] if "loss" in row]
    assert [row["step"] for row in rows] == list(range(resume + 1, n_steps + 1))
    assert all(row["samples_seen"] == row["step"] * 8 for row in rows)
    # the final checkpoint is complete; keep-last 2 pruned the older ones
    assert ckpt.latest_complete(cdir)[0] == n_steps
    assert sorted(p.name for p in cdir.iterdir() if p.is_dir()) == [ckpt.tag_for(n_steps - every), ckpt.tag_for(n_steps)]
    assert ckpt.verify(cdir, ckpt.tag_for(n_steps))["world_size"] == 2
    assert json.loads((out / "last" / "encoder.json").read_text())["step"] == n_steps
    # the shipped CPU config (fp32, ZeRO-0): the resumed state, a falling loss, and the exact export
    check_resumed_state(dbg, out, resume, world=2, max_steps=n_steps, peak=0.3 * 8 / 256)
    losses = [row["loss"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    check_exact_export(out, ckpt.tag_for(n_steps), zero_stage=0)


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


# ------------------------------------------------------------------ training state across a resume

def _ds_schedule(n: int, *, max_steps: int, warmup: int, peak: float, min_ratio: float = 0.01) -> list[float]:
    """The lr of steps 1..n of an uninterrupted run: DeepSpeed's WarmupCosineLR stepped once per step."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = WarmupCosineLR(opt, total_num_steps=max_steps, warmup_num_steps=min(warmup, max_steps),
                           warmup_type="linear", warmup_min_ratio=0.0, cos_min_ratio=min_ratio)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    return lrs


def _optim_sums(path: Path) -> dict[tuple[str, str], tuple[float, ...]]:
    """(saved|resumed, tag) -> (sum exp_avg, sum exp_avg_sq, sum step, tensors) from an optim_rank*.txt."""
    out = {}
    for line in _lines(path):
        kind, tag, *vals = line.split()
        out[(kind, tag)] = tuple(float(v) for v in vals)
    return out


def check_resumed_state(dbg: Path, out: Path, resume: int, *, world: int, max_steps: int, peak: float) -> None:
    """After a resume at step `resume`: the Adam moments each rank holds equal what it saved in that
    checkpoint, and every logged lr (before and after the restart) is the uninterrupted schedule's."""
    tag = ckpt.tag_for(resume)
    for k in range(world):
        sums = _optim_sums(dbg / f"optim_rank{k}.txt")
        saved, resumed = sums[("saved", tag)], sums[("resumed", tag)]
        assert saved[3] > 0 and saved[1] > 0, saved           # there was Adam state to keep
        assert resumed == saved, (k, saved, resumed)          # ... and the resumed rank holds exactly it
    expected = _ds_schedule(max_steps, max_steps=max_steps, warmup=2, peak=peak)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "lr" in r]
    assert rows and {r["step"] for r in rows} == set(range(1, max_steps + 1))
    for r in rows:  # first launch, and the resumed one (steps after `resume` are logged by both)
        assert r["lr"] == pytest.approx(expected[r["step"] - 1], rel=1e-9, abs=1e-12), (r["step"], r["lr"])


def check_exact_export(out: Path, tag: str, zero_stage: int) -> None:
    """RUN/last/encoder.pt is float32 and equals DeepSpeed's own fp32 consolidation of the last checkpoint."""
    import torch

    enc = torch.load(out / "last" / "encoder.pt", map_location="cpu", weights_only=True)
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ref = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
    else:  # ZeRO-0 writes no partitions: its model file holds the fp32 module itself
        ref = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                         weights_only=False)["module"]
    params = {k for k, v in enc.items() if v.is_floating_point()}
    assert params and all(enc[k].dtype == torch.float32 for k in params)
    compared = [k for k in params if f"encoder.{k}" in ref and ref[f"encoder.{k}"].is_floating_point()]
    assert len(compared) >= 0.5 * len(params), (len(compared), len(params))
    worst = max((enc[k] - ref[f"encoder.{k}"].float()).abs().max().item() for k in compared)
    assert worst <= 1e-6, worst


def test_bf16_zero2_two_ranks_kill_resume_exact_export(tmp_path):
    """The GPU default config (torch_autocast bf16, ZeRO-2) on 2 CPU ranks with a BatchNorm encoder: trains,
    checkpoints, is killed with kill -9, resumes with its optimizer and lr state, finishes with a falling
    loss, and exports the fp32 master weights; a resume at another rank count is refused with one line."""
    max_steps, every = 6, 2
    shards = make_shards(tmp_path / "shards")
    out, dbg = tmp_path / "run", tmp_path / "debug"
    args = base_cmd(shards, out, "--max-steps", str(max_steps), "--checkpoint-every", str(every), "--val-every", "100",
                    "--deepspeed_config", "launch/configs/ds_zero2_bf16.json", "--encoder", "tu-mobilenetv3_small_050",
                    "--image-size", "32", "--debug-keys", str(dbg), "--debug-step-sleep", "0.2")

    def launch(**kw):
        return subprocess.Popen([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *args], cwd=REPO,
                                env=run_env(), text=True, start_new_session=True, **kw)

    log = tmp_path / "first.log"
    proc = launch(stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: ckpt.verify(out / "checkpoints", ckpt.tag_for(every)) is not None
                  and max(_steps(dbg / "params_rank0.txt"), default=0) >= every + 1, 300, proc, f"step {every + 1}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        _wait_for(lambda: not _group_alive(proc.pid), 30, what="every process of the killed job to exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    resume = ckpt.latest_complete(out / "checkpoints")[0]
    assert resume in (2, 4), log.read_text()[-3000:]
    run_id = (out / "wandb_run_id.txt").read_text()

    r = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *args], cwd=REPO,
                       env=run_env(), check=False, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / ckpt.tag_for(resume)} at step {resume}" in r.stdout
    assert f"pretrain: done at step {max_steps};" in r.stdout and "bf16 (autocast), ZeRO 2" in r.stdout
    assert (out / "wandb_run_id.txt").read_text() == run_id  # a restart continues the same W&B run
    check_resumed_state(dbg, out, resume, world=2, max_steps=max_steps, peak=0.3 * 8 / 256)
    losses = [row["loss"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.01, losses
    check_exact_export(out, ckpt.tag_for(max_steps), zero_stage=2)
    desc = json.loads((out / "last" / "encoder.json").read_text())
    assert (desc["precision"], desc["precision_mode"], desc["zero_stage"]) == ("bf16", "autocast", 2)

    # ZeRO-2 partitions were written by 2 ranks: one process must refuse them, in one line, with exit 2
    r1 = subprocess.run([PY, *args, "--max-steps", str(max_steps + 2)], cwd=REPO, env=run_env(), check=False,
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 2, r1.stdout[-2000:] + r1.stderr[-2000:]
    last = r1.stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain.py: error: checkpoint") and "resume with 2 ranks (this job has 1)" in last
    assert "Traceback" not in r1.stderr
