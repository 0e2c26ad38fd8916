"""Faults during pretraining: kill -9 of the whole job (also mid-save) or of one rank, then resume; a full disk; NaN.

Each case launches the real entry point in subprocesses, as a user would, and checks what survives.
"""
from __future__ import annotations

import itertools
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


def _paused(dbg: Path, rank: int) -> list[str]:
    """The kill points (--debug-pause-at) a rank has stopped at so far, in order."""
    return _lines(dbg / f"paused_rank{rank}.txt")


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    """The 2-rank job in its own process group, its output to a file (nobody reads a pipe while a test waits)."""
    return subprocess.Popen([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *args], cwd=REPO,
                            env=run_env(), stdout=log.open("a"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _run(args: list[str], log: Path, timeout: float = 400) -> tuple[int, str]:
    """Run the 2-rank job to its end: (exit code, output). On a timeout (a hang) the whole group is killed."""
    proc = _launch(args, log)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job hung:\n{log.read_text()[-4000:]}")
    finally:
        _reap(proc)
    return proc.returncode, log.read_text()


def _wait_paused(proc, dbg: Path, point: str, ranks, log: Path, timeout: float = 300) -> None:
    def there():
        return all(point in _paused(dbg, k) for k in ranks)

    end = time.time() + timeout
    while not there():
        if proc.poll() is not None:
            pytest.fail(f"the job exited ({proc.returncode}) before kill point {point}:\n{log.read_text()[-4000:]}")
        if time.time() > end:
            pytest.fail(f"timed out waiting for kill point {point}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _wait_for(lambda: not _group_alive(proc.pid), 30, what="every process of the killed job to exit")


# three 2-rank launches, ~1.5-2.5 min on 2 loaded cores: in `make test`
def test_kill_whole_job_at_random_step_then_one_rank_mid_save_then_resume(tmp_path):
    """kill -9 of the whole job, then of one rank in the middle of a save; the same command then finishes.

    The kill points are hooks (--debug-pause-at), so where each kill lands does not depend on the machine:
    1st launch: every rank stops after step K (drawn from a seeded RNG; PRETRAIN_KILL_SEED draws another),
    before that step's checkpoint; the whole job (launcher, ranks, loader workers) is killed there.
    2nd launch: resumes, and rank 0 stops inside its first checkpoint save, after DeepSpeed wrote the model
    file; only rank 0 is killed. The launcher must stop rank 1, which waits in DeepSpeed's barrier.
    3rd launch: resumes from the same complete checkpoint as the 2nd, never from the torn one, and finishes.
    """
    n_steps, every = 6, 2
    kill_step = random.Random(KILL_SEED).randint(3, 5)
    resume = (kill_step - 1) // every * every  # the pause is before step K's own checkpoint
    torn = ckpt.tag_for(resume + every)
    shards = make_shards(tmp_path / "shards")
    out, dbg = tmp_path / "run", tmp_path / "debug"
    cdir = out / "checkpoints"
    args = base_cmd(shards, out, "--max-steps", str(n_steps), "--checkpoint-every", str(every), "--keep-last", "2",
                    "--val-every", "100", "--debug-keys", str(dbg),
                    "--debug-pause-at", f"{kill_step},{resume + every}s")
    why = f"seed {KILL_SEED}: killed after step {kill_step}, resume from {resume}"

    def resumed_line(step):
        return f"pretrain: resumed from {cdir / ckpt.tag_for(step)} at step {step} ({step * 8} samples seen)"

    # 1st launch: kill -9 of the whole job after step K.
    log1 = tmp_path / "launch1.log"
    proc = _launch(args, log1)
    try:
        _wait_paused(proc, dbg, str(kill_step), (0, 1), log1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _reap(proc)
    assert [max(_steps(dbg / f"params_rank{k}.txt")) for k in range(2)] == [kill_step] * 2, why
    assert ckpt.latest_complete(cdir)[0] == resume, why
    first = [_steps(dbg / f"params_rank{k}.txt") for k in range(2)]  # the 1st launch ran steps 1..K unbroken

    # 2nd launch, same command: resumes, then kill -9 of rank 0 alone in the middle of its first save.
    log2 = tmp_path / "launch2.log"
    proc = _launch(args, log2)
    try:
        _wait_paused(proc, dbg, f"{resume + every}s", (0,), log2)
        os.kill(int((dbg / "pid_rank0.txt").read_text()), signal.SIGKILL)
        try:  # the launcher must notice the dead rank and stop the other one, not hang in a collective
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the job hung after one rank was killed:\n" + log2.read_text()[-3000:])
        assert proc.returncode != 0
    finally:
        _reap(proc)
    out2 = log2.read_text()
    assert resumed_line(resume) in out2, why + "\n" + out2[-3000:]
    files = {p.name for p in (cdir / torn).iterdir()}
    assert "mp_rank_00_model_states.pt" in files and ckpt.MARKER not in files, files
    assert ckpt.verify(cdir, torn) is None and ckpt.latest_complete(cdir)[0] == resume
    assert (cdir / "latest").read_text() == ckpt.tag_for(resume)  # written after COMPLETE.json only
    # A `latest` naming the torn tag (as DeepSpeed's own, written before any marker, could) is not trusted.
    (cdir / "latest").write_text(torn)
    params_b = [_steps(dbg / f"params_rank{k}.txt") for k in range(2)]
    n_params = [len((dbg / f"params_rank{k}.txt").read_text().splitlines()) for k in range(2)]
    n_rows = len(read_jsonl(out / "metrics.jsonl"))

    # 3rd launch, same command: resumes from the last complete checkpoint and finishes.
    rc, out3 = _run(args, tmp_path / "launch3.log")
    assert rc == 0, why + "\n" + out3[-4000:]
    assert resumed_line(resume) in out3, why + "\n" + out3[-3000:]
    assert "resumed from" not in out3.replace(resumed_line(resume), "")
    assert f"pretrain: done at step {n_steps};" in out3
    # the step counter continues from the checkpoint, on both ranks, with identical parameters after every step
    after = [dict(line.split() for line in (dbg / f"params_rank{k}.txt").read_text().splitlines()[n_params[k]:])
             for k in range(2)]
    assert sorted(map(int, after[0])) == list(range(resume + 1, n_steps + 1)), why
    assert after[0] == after[1]
    # the 2nd and 3rd launches restarted from the same state at the same stream position: same parameters;
    # and as the 1st launch had them, uninterrupted: the data order and the corruption resume exactly
    assert all(after[0][str(s)] == params_b[0][s] for s in range(resume + 1, resume + every + 1)), why
    assert all(after[0][str(s)] == first[0][s] for s in range(resume + 1, kill_step + 1)), why
    rows = [row for row in read_jsonl(out / "metrics.jsonl")[n_rows:] if "loss" in row]
    assert [row["step"] for row in rows] == list(range(resume + 1, n_steps + 1))
    assert all(row["samples_seen"] == row["step"] * 8 for row in rows)
    # the final checkpoint is complete; keep-last 2 pruned the older ones and the torn tag
    assert ckpt.latest_complete(cdir)[0] == n_steps and (cdir / "latest").read_text() == ckpt.tag_for(n_steps)
    assert sorted(p.name for p in cdir.iterdir() if p.is_dir()) == [ckpt.tag_for(n_steps - every), ckpt.tag_for(n_steps)]
    assert ckpt.verify(cdir, ckpt.tag_for(n_steps))["world_size"] == 2
    assert json.loads((out / "last" / "encoder.json").read_text())["step"] == n_steps
    # the shipped CPU config (fp32, ZeRO-0): the resumed state, a falling loss, and the exact export
    check_resumed_state(dbg, out, resume, world=2, max_steps=n_steps, peak=0.3 * 8 / 256)
    losses = [row["loss"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    check_exact_export(out, ckpt.tag_for(n_steps), zero_stage=0)


def _zero1_config(tmp_path: Path, **extra) -> str:
    """The shipped CPU JSON with ZeRO-1: every rank writes its own optimizer partition file."""
    cfg = json.loads((REPO / "launch/configs/ds_cpu.json").read_text())
    cfg.update(zero_optimization={"stage": 1}, **extra)
    path = tmp_path / "ds_zero1_cpu.json"
    path.write_text(json.dumps(cfg))
    return str(path)


# one 2-rank launch: ~25-40 s on 2 loaded cores
def test_full_disk_on_one_rank_then_nan_on_one_rank(tmp_path):
    """2 ranks, ZeRO-1 (each rank writes its own file). Step 4's save: rank 1's write of its optimizer
    partition hits a real write failure inside DeepSpeed (torch.save under a file-size limit, the RuntimeError
    a full disk gives) while rank 0's writes succeed. Every rank skips that checkpoint, the partial tag is
    deleted, a warning names the failure and the last complete checkpoint, and training goes on (step 6 is
    saved). Step 7: the loss is NaN on rank 1 only; both ranks write their dump and stop with exit 3."""
    shards = make_shards(tmp_path / "shards")
    out, dbg = tmp_path / "run", tmp_path / "debug"
    cdir = out / "checkpoints"
    args = base_cmd(shards, out, "--max-steps", "8", "--checkpoint-every", "2", "--val-every", "100",
                    "--deepspeed_config", _zero1_config(tmp_path), "--debug-keys", str(dbg),
                    "--debug-disk-full-at-step", "4", "--debug-disk-full-rank", "1",
                    "--debug-nan-at-step", "7", "--debug-nan-rank", "1")
    rc, text = _run(args, tmp_path / "launch.log")
    assert rc == 3, text[-5000:]
    assert "Traceback" not in text, text[-5000:]

    # the full disk: one warning from rank 0 naming rank 1's real torch error and the last complete checkpoint
    warnings = [line for line in text.splitlines() if "pretrain: warning: checkpoint" in line]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "checkpoint step_00000004 not saved, a write failed (rank 1: RuntimeError(" in w, w
    assert "rank 0:" not in w, w  # rank 0's own files were written
    assert "the last complete checkpoint is step_00000002; training goes on" in w, w
    assert not (cdir / ckpt.tag_for(4)).exists()  # rank 0's complete files and rank 1's partial one: gone
    assert [s for s, _, _ in ckpt.complete_tags(cdir)] == [2, 6]  # the next save after the failure works
    assert (cdir / "latest").read_text() == ckpt.tag_for(6)
    assert {f for f in ckpt.verify(cdir, ckpt.tag_for(6))["files"]} >= {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert sorted(_steps(dbg / "params_rank0.txt")) == list(range(1, 8))  # trained on to step 7

    # the NaN on rank 1: both ranks stop at step 7 with exit 3, each naming its own dump
    for name in ("nan_dump.json", "nan_dump_rank1.json"):  # (both ranks write to one log: no line-start test)
        assert ("pretrain: error: non-finite loss at step 7 on 1 micro-step(s) over the ranks (seen at step 7); "
                f"diagnostics in {out / name}") in text, (name, text[-3000:])
    dumps = [json.loads((out / name).read_text()) for name in ("nan_dump.json", "nan_dump_rank1.json")]
    assert [d["rank"] for d in dumps] == [0, 1]
    for d in dumps:
        assert d["step"] == 7 and d["detected_at_step"] == 7 and d["nonfinite_micro_steps_all_ranks"] == 1
        assert d["input"]["shape"] == [4, 1, 64, 64] and d["input"]["nonfinite"] == 0 and len(d["keys"]) == 4
        assert d["samples_seen"] == 7 * 8
    assert dumps[1]["loss"] == "nan" and dumps[0]["loss"] not in ("nan", "inf", "-inf")
    assert float(dumps[0]["loss"]) > 0
    assert dumps[0]["lr"] == dumps[1]["lr"] and dumps[0]["keys"] != dumps[1]["keys"]
    keys7 = [[line.split()[1] for line in _lines(dbg / f"keys_rank{k}.txt") if line.split()[0] == "6"]
             for k in range(2)]
    assert [d["keys"] for d in dumps] == keys7  # each rank's own batch of step 7
    assert dumps[0]["nonfinite_params"] == dumps[1]["nonfinite_params"]  # the ranks' weights are one state
    assert ckpt.latest_complete(cdir)[0] == 6  # nothing saved after the NaN


@pytest.mark.faults_heavy  # 7 two-rank launches: ~3-5 min on 2 shared cores; `make test-faults` runs it
def test_kill_soak_resumes_exactly_like_an_uninterrupted_run(tmp_path):
    """One 2-rank run killed with kill -9 at 6 kill points drawn at random (seeded), each followed by the
    same command, against the same run uninterrupted. Gradient accumulation 2 with an epoch of 7 micro-batches
    per rank, so resumes land mid-epoch and accumulation windows straddle epochs. Every logged step, sample
    count and lr equals the uninterrupted run's, and because the stream position and the corruption resume
    exactly, so does every step's sample keys and parameters, and the final encoder bit for bit."""
    n_steps, every = 12, 3
    rng = random.Random(KILL_SEED)
    steps = sorted(rng.sample(range(2, n_steps), 5))
    points = [f"{s}" for s in steps] + [f"{rng.choice(range(every, n_steps, every))}s"]
    shards = make_shards(tmp_path / "shards")
    ds = _zero1_config(tmp_path, gradient_accumulation_steps=2)
    common = ["--max-steps", str(n_steps), "--checkpoint-every", str(every), "--keep-last", "2",
              "--val-every", "100", "--epoch-size", "56", "--deepspeed_config", ds]
    ref_out, ref_dbg = tmp_path / "ref", tmp_path / "ref_debug"
    rc, text = _run(base_cmd(shards, ref_out, *common, "--debug-keys", str(ref_dbg)), tmp_path / "ref.log")
    assert rc == 0, text[-4000:]

    out, dbg = tmp_path / "run", tmp_path / "debug"
    args = base_cmd(shards, out, *common, "--debug-keys", str(dbg), "--debug-pause-at", ",".join(points))
    why = f"seed {KILL_SEED}: kill points {points}"
    killed: list[str] = []
    starts: list[list[int]] = []  # per launch: where each rank's keys file stood when it started
    for launch in range(len(points) + 2):
        starts.append([len(_lines(dbg / f"keys_rank{k}.txt")) for k in range(2)])
        log = tmp_path / f"launch{launch}.log"
        proc = _launch(args, log)
        try:
            end, new = time.time() + 400, []
            while proc.poll() is None and not new:
                if time.time() > end:
                    pytest.fail(f"{why}: launch {launch} neither stopped nor finished:\n{log.read_text()[-3000:]}")
                new = [p for p in _paused(dbg, 0) + _paused(dbg, 1) if p not in killed]
                time.sleep(0.1)
            if new:  # "N": every rank stops after step N; "Ns": rank 0 stops inside the step-N save
                _wait_paused(proc, dbg, new[0], (0,) if new[0].endswith("s") else (0, 1), log)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                killed.append(new[0])
                continue
        finally:
            _reap(proc)
        assert proc.returncode == 0, why + "\n" + log.read_text()[-4000:]
        break
    assert sorted(killed) == sorted(points), why  # every kill point was taken, once: 6 kills
    assert f"pretrain: done at step {n_steps};" in log.read_text()

    ref_rows = {row["step"]: row for row in read_jsonl(ref_out / "metrics.jsonl") if "loss" in row}
    rows = [row for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert sorted(ref_rows) == list(range(1, n_steps + 1))
    assert {row["step"] for row in rows} == set(ref_rows), why  # replayed steps are logged again
    for row in rows:
        ref = ref_rows[row["step"]]
        assert (row["samples_seen"], row["lr"], row["effective_batch"]) == (
            ref["samples_seen"], ref["lr"], ref["effective_batch"]), (why, row, ref)
        assert row["loss"] == ref["loss"], (why, row["step"], row["loss"], ref["loss"])
    for k in range(2):
        ref_params = _steps(ref_dbg / f"params_rank{k}.txt")
        for step, value in _step_lines(dbg / f"params_rank{k}.txt"):
            assert value == ref_params[step], (why, k, step)
        ref_keys = _key_blocks(_lines(ref_dbg / f"keys_rank{k}.txt"))
        assert len({s for s, _ in ref_keys}) == len(ref_keys) == n_steps
        ref_keys = dict(ref_keys)
        lines = _lines(dbg / f"keys_rank{k}.txt")
        cuts = [st[k] for st in starts] + [len(lines)]
        for a, b in itertools.pairwise(cuts):  # each launch's own steps
            for step, keys in _key_blocks(lines[a:b]):
                assert keys == ref_keys[step], (why, k, step)
    import torch

    final, ref_final = (torch.load(d / "encoder.pt", map_location="cpu", weights_only=True) for d in (out, ref_out))
    assert final.keys() == ref_final.keys()
    assert all(torch.equal(final[k], ref_final[k]) for k in final), why


def _step_lines(path: Path) -> list[tuple[int, str]]:
    return [(int(r[0]), r[1]) for r in (line.split() for line in _lines(path)) if len(r) == 2]


def _key_blocks(lines: list[str]) -> list[tuple[int, list[str]]]:
    """(step, keys) per run of consecutive `step key` lines with the same step (within one launch)."""
    blocks: list[tuple[int, list[str]]] = []
    for step, key in ((int(a), b) for a, b in (line.split() for line in lines)):
        if blocks and blocks[-1][0] == step:
            blocks[-1][1].append(key)
        else:
            blocks.append((step, [key]))
    return blocks


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
                    "--image-size", "32", "--debug-keys", str(dbg), "--debug-pause-at", str(every + 1))

    log = tmp_path / "first.log"
    proc = _launch(args, log)
    try:  # every rank stops after step 3 (a hook), and the whole job is killed there
        _wait_paused(proc, dbg, str(every + 1), (0, 1), log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _reap(proc)
    resume = ckpt.latest_complete(out / "checkpoints")[0]
    assert resume == every, log.read_text()[-3000:]
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
