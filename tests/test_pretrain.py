"""Pretraining engine: config checks, checkpoint bookkeeping, and one 2-rank `deepspeed` run on tiny shards.

The 2-rank run is a single launch that checks several things at once, because each DeepSpeed CPU launch
costs seconds of start-up: disjoint data per rank, identical parameters across ranks after every step,
falling loss, validation counting each sample once, exports, sample grids, metrics and config files.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain import checkpoint as ckpt
from pretrain.engine import build_parser, check_args, load_ds_config
from runkit.errors import UserError
from runkit.tracking import read_jsonl
from runkit.typed import parse_layered

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")


def _phantom(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth chest-like blob image: two dark lungs in a bright body, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = 0.75 - 0.3 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    for cx in (0.32, 0.68):
        cx += rng.uniform(-0.04, 0.04)
        body -= 0.35 * np.exp(-(((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img = body + 0.03 * rng.standard_normal((size, size))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_shards(out: Path, *, n_train_shards=8, per_shard=8, n_val=12, size=64, seed=0,
                encoding="png") -> dict[str, str]:
    """Tiny shard folder in the project's format (`<key>.png` or, raw, `<key>.npy`, + `<key>.json`)."""
    import webdataset as wds
    from PIL import Image

    from shards.writer import encode_npy

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    def write(path, keys, split):
        with wds.TarWriter(str(path)) as tw:
            for key in keys:
                img = _phantom(rng, size)
                rec = {"key": key, "source": "phantom", "patient_id": key, "view": "PA", "split": split,
                       "labels": {"diagnosis": None, "findings": [], "severity": None}, "meta": {}}
                if encoding == "raw":
                    rec["pixels"] = {"shape": list(img.shape), "dtype": "uint8"}
                    tw.write({"__key__": key, "npy": encode_npy(img), "json": json.dumps(rec).encode()})
                    continue
                buf = io.BytesIO()
                Image.fromarray(img, mode="L").save(buf, format="PNG")
                tw.write({"__key__": key, "png": buf.getvalue(), "json": json.dumps(rec).encode()})

    for s in range(n_train_shards):
        write(out / f"train-{s:06d}.tar", [f"tr{s:02d}_{i:03d}" for i in range(per_shard)], "train")
    write(out / "val-000000.tar", [f"va_{i:03d}" for i in range(n_val // 2)], "val")
    write(out / "val-000001.tar", [f"va_{i:03d}" for i in range(n_val // 2, n_val)], "val")
    return {"train": str(out / "train-*.tar"), "val": str(out / "val-*.tar")}


def base_cmd(shards: dict, out: Path, *extra: str) -> list[str]:
    return ["launch/pretrain.py", "--train-shards", shards["train"], "--val-shards", shards["val"],
            "--out", str(out), "--deepspeed_config", "launch/configs/ds_cpu.json", "--encoder", "resnet18",
            "--image-size", "64", "--batch-size", "4", "--epoch-size", "64", "--num-workers", "1",
            "--shuffle-buffer", "16", "--lr", "0.3", "--warmup-steps", "2", "--log-every", "1",
            "--wandb-mode", "disabled", *extra]


def run_env() -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               DS_ACCELERATOR="cpu", TQDM_DISABLE="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- fast unit tests

def _args(*argv):
    return parse_layered(build_parser(), list(argv))


def test_bad_user_input_is_user_error(tmp_path):
    ok = ["--train-shards", "x.tar", "--out", str(tmp_path)]
    with pytest.raises(UserError, match="multiple of 32"):
        check_args(_args(*ok, "--image-size", "100"))
    with pytest.raises(UserError, match="unknown encoder"):
        check_args(_args(*ok, "--encoder", "vgg_banana"))
    with pytest.raises(UserError, match="ms-ssim needs"):
        check_args(_args(*ok, "--loss", "ms-ssim", "--image-size", "128"))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("encoder: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        _args("--config", str(bad_yaml))
    typo = tmp_path / "typo.yaml"
    typo.write_text("encodr: resnet18\n")
    with pytest.raises(UserError, match="unknown key 'encodr'"):
        _args("--config", str(typo))
    for text, what in (("wandb_mode: bogus\n", "wandb_mode"), ("image_size: big\n", "image_size"),
                       ("max-steps: 1.5\n", "max-steps")):  # YAML values are checked like the flags
        bad = tmp_path / "bad_value.yaml"
        bad.write_text(text)
        with pytest.raises(UserError, match=what):
            _args("--config", str(bad))


def test_yaml_then_cli_layering(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("encoder: resnet18\nimage_size: 64\nmax-steps: 7\ngenesis: {flip_prob: 0.0}\n")
    a = _args("--config", str(cfg), "--max-steps", "9", "--local_rank=1")
    assert (a.encoder, a.image_size, a.max_steps, a.local_rank, a.genesis) == ("resnet18", 64, 9, 1, {"flip_prob": 0.0})
    demo = _args("--config", str(REPO / "launch/configs/pretrain_demo.yaml"))
    assert demo.image_size % 32 == 0


def test_ds_config_batch_consistency(tmp_path):
    cfg = load_ds_config(str(REPO / "launch/configs/ds_cpu.json"), micro_batch=4, world_size=2)
    assert cfg["train_batch_size"] == 4 * cfg["gradient_accumulation_steps"] * 2
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8,
                               "gradient_accumulation_steps": 2}))
    with pytest.raises(UserError, match=r"train_batch_size 64 != micro batch 8 x gradient_accumulation_steps 2 x world size 2"):
        load_ds_config(str(bad), micro_batch=None, world_size=2)
    assert load_ds_config(str(bad), micro_batch=None, world_size=4)["train_batch_size"] == 64
    with pytest.raises(UserError, match="does not exist"):
        load_ds_config(str(tmp_path / "nope.json"), micro_batch=1, world_size=1)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_ds_config(str(tmp_path / "broken.json"), micro_batch=1, world_size=1)
    for name in ("ds_cpu.json", "ds_zero2_bf16.json", "ds_zero1_fp16.json"):
        json.loads((REPO / "launch/configs" / name).read_text())


def test_lone_rank_zero0_engine_skips_allreduce_and_steps_like_plain_torch(monkeypatch):
    """One process, ZeRO-0: the no-op gradient all-reduce is skipped, and the engine's update is still
    exactly a plain `backward; clip; AdamW.step`."""
    import copy

    import deepspeed
    import torch

    from pretrain.engine import distributed, skip_lone_rank_allreduce

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(4, 6), torch.randn(4, 1)
    with distributed():
        cfg = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4, "gradient_clipping": 0.1,
               "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
        model = copy.deepcopy(base)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                          model_parameters=model.parameters(), config=cfg)
        assert skip_lone_rank_allreduce(engine) and not engine.enable_backward_allreduce
        plain = copy.deepcopy(base)
        opt = torch.optim.AdamW(plain.parameters(), lr=0.1)
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            torch.nn.functional.mse_loss(plain(x), y).backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
            opt.step()
            opt.zero_grad()
        for a, b in zip(engine.module.parameters(), plain.parameters()):
            torch.testing.assert_close(a, b)
        model1 = copy.deepcopy(base)
        engine1, *_ = deepspeed.initialize(model=model1, optimizer=torch.optim.AdamW(model1.parameters()),
                                           model_parameters=model1.parameters(),
                                           config={**cfg, "zero_optimization": {"stage": 1}})
        assert not skip_lone_rank_allreduce(engine1)                  # ZeRO-1 reduces in its optimizer


def test_checkpoint_markers_and_pruning(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (d / ckpt.tag_for(step)).mkdir(parents=True)
        (d / ckpt.tag_for(step) / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
        ckpt.mark_complete(d, ckpt.tag_for(step), {"step": step, "world_size": 1})
    (d / ckpt.tag_for(8)).mkdir()  # half-written: no marker
    (d / ckpt.tag_for(8) / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (d / "latest").write_text(ckpt.tag_for(8))  # DeepSpeed's pointer is not trusted
    assert ckpt.latest_complete(d)[0] == 6
    # a file truncated after the marker was written makes the tag incomplete
    (d / ckpt.tag_for(6) / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert ckpt.latest_complete(d)[0] == 4
    removed = ckpt.prune(d, keep_last=1)
    assert removed == [ckpt.tag_for(2)]
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == [ckpt.tag_for(s) for s in (4, 6, 8)]
    ckpt.remove_partial(d, ckpt.tag_for(8))
    assert not (d / ckpt.tag_for(8)).exists()
    assert (d / "latest").read_text() == ckpt.tag_for(8)  # mark_complete rewrites it; remove_partial does not
    ckpt.mark_complete(d, ckpt.tag_for(4), {"step": 4})
    assert (d / "latest").read_text() == ckpt.tag_for(4)


def test_write_errors_inside_a_save_are_recorded_not_raised(tmp_path):
    """What a failed write does inside DeepSpeed's save (the 2-rank case: test_pretrain_resume.py): the real
    torch error of a full file system is recorded, the rest of this rank's writes are skipped, the save's
    own code after its writes still runs, and the patched methods are restored. Other errors propagate."""
    import resource
    import signal

    import torch

    class Engine:  # the attributes catch_write_errors wraps, as DeepSpeed's engine has them
        def __init__(self):
            self.checkpoint_engine = type("CE", (), {"save": lambda self, sd, path: torch.save(sd, path),
                                                     "makedirs": lambda self, path, exist_ok=False: None})()
            self.writes = []

        def _copy_recovery_script(self, path):
            self.writes.append(path)

        def save_checkpoint(self, d):  # two files, a script copy, then code that must still run (a barrier)
            self.checkpoint_engine.save({"w": torch.zeros(100_000)}, str(d / "a.pt"))
            self.checkpoint_engine.save({"w": torch.zeros(10)}, str(d / "b.pt"))
            self._copy_recovery_script(str(d))
            self.writes.append("barrier")

    e = Engine()
    old = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with ckpt.catch_write_errors(e) as errors:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old[0][1]))  # the kernel refuses past 4 KiB
            try:
                e.save_checkpoint(tmp_path)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, old[0])
    finally:
        signal.signal(signal.SIGXFSZ, old[1])
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors  # torch's zip writer error
    assert (tmp_path / "a.pt").stat().st_size == 4096 and not (tmp_path / "b.pt").exists()
    assert e.writes == ["barrier"]  # the script copy was skipped, the code after the writes ran
    assert "save" not in vars(e.checkpoint_engine) and "_copy_recovery_script" not in vars(e)  # restored

    e.checkpoint_engine.save = lambda sd, path: (tmp_path / "no" / "such" / "dir").write_bytes(b"x")
    with ckpt.catch_write_errors(e) as errors:  # OSError: recorded too
        e.save_checkpoint(tmp_path)
    assert len(errors) == 1 and isinstance(errors[0], FileNotFoundError) and e.writes[-1] == "barrier"
    e.checkpoint_engine.save = lambda sd, path: (_ for _ in ()).throw(TypeError("not a write error"))
    with pytest.raises(TypeError), ckpt.catch_write_errors(e):  # a bug is not a full disk
        e.checkpoint_engine.save({}, "x")


def test_missing_shards_exit_2(tmp_path):
    r = subprocess.run([PY, "launch/pretrain.py", "--train-shards", str(tmp_path / "none-*.tar"), "--out",
                        str(tmp_path / "run"), "--image-size", "64"], cwd=REPO, env=run_env(),
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("pretrain.py: error: shard pattern")
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------ the 2-rank deepspeed run

@pytest.mark.slow
def test_two_rank_deepspeed_run(tmp_path):
    shards = make_shards(tmp_path / "shards")
    out, dbg = tmp_path / "run", tmp_path / "debug"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
           *base_cmd(shards, out, "--max-steps", "10", "--checkpoint-every", "5", "--keep-last", "1",
                     "--val-every", "5", "--debug-keys", str(dbg))]
    r = subprocess.run(cmd, cwd=REPO, env=run_env(), check=False, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    # the ranks read different samples at every step (shards are resampled per rank)
    keys = [{} for _ in range(2)]
    for rank in range(2):
        for line in (dbg / f"keys_rank{rank}.txt").read_text().splitlines():
            step, key = line.split()
            keys[rank].setdefault(int(step), set()).add(key)
    assert sorted(keys[0]) == sorted(keys[1]) == list(range(10))
    overlap = sum(len(keys[0][s] & keys[1][s]) for s in range(10))
    assert overlap <= 10, f"ranks share {overlap} of 40 sample slots"
    assert all(keys[0][s] != keys[1][s] for s in range(10))

    # parameters identical across ranks after every step
    sums = [dict(line.split() for line in (dbg / f"params_rank{r}.txt").read_text().splitlines()) for r in range(2)]
    assert sorted(sums[0], key=int) == [str(s) for s in range(1, 11)]
    assert sums[0] == sums[1]
    assert sums[0]["1"] != sums[0]["10"]  # and they did change

    rows = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02, losses
    first = next(r for r in rows if "loss" in r)
    assert first["effective_batch"] == 8 and first["images_per_s"] > 0
    assert first["peak_lr"] == pytest.approx(0.3 * 8 / 256)  # lr scaled by the effective batch
    lrs = [r["lr"] for r in rows if "lr" in r]
    # linear warmup from 0, then cosine decay below the scaled peak
    assert lrs[0] == 0.0 and 0.9 * 0.3 * 8 / 256 < max(lrs) <= 0.3 * 8 / 256 + 1e-9 and lrs[-1] < max(lrs) / 2

    vals = [r for r in rows if "val/ssim" in r]
    assert [v["step"] for v in vals] == [5, 10]
    assert all(v["val/count"] == 12 for v in vals)  # each val sample exactly once over both ranks
    assert vals[-1]["val/ssim"] > vals[-1]["val/ssim_identity"] - 0.5
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00000005.png", "step_00000010.png"]

    enc = json.loads((out / "encoder.json").read_text())
    assert enc["encoder"] == "resnet18" and enc["image_size"] == 64 and enc["step"] in (5, 10)
    assert json.loads((out / "last" / "encoder.json").read_text())["step"] == 10
    tags = [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()]
    assert tags == ["step_00000010"]  # keep-last 1
    assert ckpt.verify(out / "checkpoints", "step_00000010")["world_size"] == 2
    assert "git_sha" in (out / "config.yaml").read_text()
    assert "loss" in r.stdout and "img/s" in r.stdout


# ---------------------------------------------------- in-process runs: host syncs, accumulation, time budget

def _inproc_args(tmp_path, shards, *extra):
    argv = base_cmd(shards, tmp_path / "run", "--encoder", "tu-mobilenetv3_small_050", "--image-size", "32",
                    "--num-workers", "0", *extra)[1:]  # [1:] drops the script name
    return parse_layered(build_parser(), argv)


@pytest.mark.slow
def test_loop_reads_the_device_only_at_sync_steps_and_accumulation_logs_effective_batch(tmp_path, monkeypatch):
    """Gradient accumulation 2 on one process: 12 micro-steps make 6 optimizer steps. The loop's own code
    (pretrain/engine.py) makes no host read (item, tolist, bool/float/int of a tensor) and no collective
    except at the sync steps, here the log steps 3 and 6 (6 is also the checkpoint and last step).
    On raw shards (uint8 `.npy`, stored at the training size): the uint8 batch is converted on the device."""
    import torch
    import torch.distributed as dist

    import pretrain.engine as engine_mod

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    shards = make_shards(tmp_path / "shards", n_train_shards=4, size=32, encoding="raw")
    ds = tmp_path / "ds_accum.json"
    ds.write_text(json.dumps({**json.loads((REPO / "launch/configs/ds_cpu.json").read_text()),
                              "gradient_accumulation_steps": 2}))
    args = _inproc_args(tmp_path, shards, "--deepspeed_config", str(ds), "--max-steps", "6", "--log-every", "3",
                        "--checkpoint-every", "6", "--val-every", "100")
    args.val_shards = None
    seen: dict = {"trainer": None, "reads": []}
    this_file = engine_mod.__file__

    orig_train = engine_mod.Trainer.train

    def train(self):
        seen["trainer"] = self
        return orig_train(self)

    def spy(name, fn):
        def wrapped(*a, **kw):
            caller = sys._getframe(1).f_code
            if caller.co_filename == this_file and seen["trainer"] is not None and caller.co_name != "_export":
                seen["reads"].append((seen["trainer"].step, name, caller.co_name))
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(engine_mod.Trainer, "train", train)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(dist, "all_reduce", spy("all_reduce", dist.all_reduce))
    assert engine_mod.run(args) == 0

    steps_read = {step for step, _, _ in seen["reads"]}
    assert steps_read == {3, 6}, seen["reads"]
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    # micro-batch 4 x accumulation 2 x 1 rank; the lr is scaled by that effective batch
    assert all(r["effective_batch"] == 8 and r["gradient_accumulation_steps"] == 2 for r in rows)
    assert all(r["samples_seen"] == 8 * r["step"] for r in rows)
    assert rows[0]["peak_lr"] == pytest.approx(0.3 * 8 / 256)
    assert (tmp_path / "run" / "encoder.pt").is_file()
    assert json.loads((tmp_path / "run" / "encoder.json").read_text())["samples_seen"] == 48


@pytest.mark.slow
def test_max_minutes_stops_checkpoints_and_exports(tmp_path, monkeypatch, capsys):
    from pretrain import engine as engine_mod

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    shards = make_shards(tmp_path / "shards", n_train_shards=4)
    args = _inproc_args(tmp_path, shards, "--max-steps", "1000", "--max-minutes", "0.02", "--debug-step-sleep",
                        "0.4", "--checkpoint-every", "500", "--val-every", "500")
    assert engine_mod.run(args) == 0
    out = capsys.readouterr().out
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    last = rows[-1]["step"]
    assert 1 <= last < 1000
    assert f"--max-minutes 0.02 spent; stopped at step {last} of 1000" in out
    assert ckpt.latest_complete(tmp_path / "run" / "checkpoints")[0] == last   # a final checkpoint at the stop
    assert json.loads((tmp_path / "run" / "last" / "encoder.json").read_text())["step"] == last
    assert any("val/ssim" in r and r["step"] == last for r in read_jsonl(tmp_path / "run" / "metrics.jsonl"))


def test_gpu_check_without_cuda_says_so_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: `make gpu-check` measures it instead")
    r = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO, env=run_env(), check=False, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("gpu-check: no CUDA device is visible here"), r.stdout


def test_precision_is_read_once_from_the_deepspeed_json():
    import torch

    from pretrain.precision import prepare_ds_config, resolve

    cpu = torch.device("cpu")
    shipped = {name: json.loads((REPO / "launch/configs" / name).read_text()) for name in
               ("ds_cpu.json", "ds_zero2_bf16.json", "ds_zero1_fp16.json")}
    p = resolve(shipped["ds_zero2_bf16.json"], cpu)
    assert (p.name, p.how, p.zero_stage, p.input_dtype) == ("bf16", "autocast", 2, torch.float32)
    assert prepare_ds_config(shipped["ds_zero2_bf16.json"], p).get("data_types") is None  # weights stay fp32
    p = resolve(shipped["ds_cpu.json"], cpu)
    assert (p.name, p.how, p.zero_stage) == ("fp32", "fp32", 0)
    whole = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}
    p = resolve(whole, cpu)
    assert (p.how, p.input_dtype) == ("deepspeed", torch.bfloat16)
    assert prepare_ds_config(whole, p)["data_types"]["buffer_dtype"] == "bf16"  # BatchNorm buffers follow
    assert prepare_ds_config({**whole, "data_types": {"buffer_dtype": "fp32"}}, p)["data_types"]["buffer_dtype"] == "fp32"
    for bad, why in (({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
                     ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both bf16 and fp16"),
                     ({"torch_autocast": {"enabled": True}, "bf16": {"enabled": True}}, "choose one"),
                     ({"torch_autocast": {"enabled": True, "dtype": "float16"}, "zero_optimization": {"stage": 2}},
                      "loss scaler")):
        with pytest.raises(UserError, match=why):
            resolve(bad, torch.device("cuda", 0))
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        with pytest.raises(UserError, match="fp16 needs a GPU"):
            resolve(shipped["ds_zero1_fp16.json"], cpu)
    assert resolve(shipped["ds_zero1_fp16.json"], torch.device("cuda", 0)).how == "deepspeed"
