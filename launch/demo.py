"""`make demo`: the whole pipeline on phantom data, end to end, ending in RUN/REPORT.md.

    python launch/demo.py [--out runs/demo] [--preset default|tiny] [--fresh]

Each stage runs the same command a user would type, prints a banner and its timing, and is recorded in
OUT/stages.json; a second run reuses finished stages (same settings) and `--fresh` starts over.
Pretraining uses every GPU when there are any, else 2 CPU ranks (gloo).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
REPO = _HERE.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from launch.report import write_report
from runkit.atomic import atomic_write_json
from runkit.errors import UserError, exit_on_user_error

# Sizes that fit the 15-minute budget on 2 CPU cores; `tiny` is the seconds-per-stage miniature CI runs.
PRESETS = {
    "default": {
        # DenseNet-121 (the severity job's frozen encoder) at 64 px: at 128 px pretraining alone took
        # 13 min on 2 busy cores, and a full fine-tune ~1.5 min per epoch.
        "n_nih": 480, "n_covid": 360, "synth_size": 128, "size": 64, "max_count": 64,
        "encoder": "densenet121", "image_size": 64, "batch_size": 8, "max_steps": 150, "epoch_size": 1200,
        "checkpoint_every": 50, "val_every": 75, "val_max_samples": 96, "lr": 0.05, "warmup_steps": 15,
        # One seed of a full fine-tune, ~7 s an epoch here (`launch/downstream.py compare --seeds` runs
        # more). Partial unfreezing (2-4 stages, 10-15 epochs) stayed near 0.45 balanced accuracy on these
        # phantoms; a full fine-tune reached 0.60-0.65 in 6-8 epochs.
        "diag_epochs": 8, "diag_seeds": [0], "diag_mode": "full", "diag_unfreeze": 2,
        "severity_repeats": 50,
        "sweep_samples": 8, "scorecam_per_class": 2,
    },
    "tiny": {
        "n_nih": 48, "n_covid": 60, "synth_size": 128, "size": 64, "max_count": 16,
        "encoder": "densenet121", "image_size": 64, "batch_size": 4, "max_steps": 6, "epoch_size": 32,
        "checkpoint_every": 3, "val_every": 3, "val_max_samples": 16, "lr": 0.05, "warmup_steps": 2,
        "diag_epochs": 1, "diag_seeds": [0], "diag_mode": "full", "diag_unfreeze": 2, "severity_repeats": 3,
        "sweep_samples": 2, "scorecam_per_class": 1,
    },
}


def banner(i: int, n: int, title: str) -> None:
    line = f"[{i}/{n}] {title}"
    print("\n" + "=" * 100 + f"\n{line}\n" + "=" * 100, flush=True)


def sh(cmd: list[str], env: dict | None = None) -> None:
    """Run one stage command, streaming its output; a failure names the command."""
    print("$ " + " ".join(cmd), flush=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    rc = subprocess.run(cmd, cwd=REPO, env=full_env, check=False).returncode
    if rc != 0:
        raise SystemExit(f"demo: stage command failed with exit code {rc}: {' '.join(cmd)}")


class Demo:
    def __init__(self, out: Path, preset: dict, wandb_mode: str):
        self.out = out
        self.p = preset
        self.py = sys.executable
        self.wandb_mode = wandb_mode
        self.data = out / "data"
        self.shards = out / "shards"
        self.run = out / "pretrain"
        self.gpus = self._gpus()

    @staticmethod
    def _gpus() -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    # ------------------------------------------------------------------ stages
    def synth(self) -> dict:
        sh([self.py, "-m", "shards", "synth", "--out", str(self.data), "--n-nih", str(self.p["n_nih"]),
            "--n-covid", str(self.p["n_covid"]), "--size", str(self.p["synth_size"]), "--seed", "0"])
        return {"data": str(self.data)}

    def build(self) -> dict:
        for source, src, dst in (("nih", "nih", "nih"), ("covid-chestxray", "covid-chestxray", "covid")):
            sh([self.py, "-m", "shards", "build", source, "--src", str(self.data / src),
                "--out", str(self.shards / dst), "--size", str(self.p["size"]),
                "--max-count", str(self.p["max_count"]), "--workers", "2"])
        return {"shards": str(self.shards)}

    def pretrain(self) -> dict:
        nih = self.shards / "nih"
        if self.gpus:
            launcher = ["deepspeed", "--num_gpus", str(self.gpus)]
            ds = "launch/configs/ds_zero2_bf16.json"
        else:
            launcher = ["deepspeed", "--num_gpus", "2"]
            ds = "launch/configs/ds_cpu.json"
        deepspeed = shutil.which("deepspeed") or str(Path(self.py).parent / "deepspeed")
        launcher[0] = deepspeed
        port = str(29500 + int(hashlib.md5(str(self.out).encode()).hexdigest(), 16) % 1000)
        p = self.p
        sh(launcher + ["--master_port", port, "launch/pretrain.py",
                       # NIH's official val draw is ~1 % of train_val: too few phantoms to validate on,
                       # so the demo validates on val + test and trains on train.
                       "--train-shards", f"{nih}/train-*.tar",
                       "--val-shards", f"{nih}/val-*.tar {nih}/test-*.tar", "--out", str(self.run), "--deepspeed_config", ds,
                       "--encoder", p["encoder"], "--image-size", str(p["image_size"]),
                       "--batch-size", str(p["batch_size"]), "--max-steps", str(p["max_steps"]),
                       "--epoch-size", str(p["epoch_size"]), "--checkpoint-every", str(p["checkpoint_every"]),
                       "--val-every", str(p["val_every"]), "--val-max-samples", str(p["val_max_samples"]),
                       # online probes on the labelled covid-format phantoms: judged against the random init
                       "--probe-shards", str(self.shards / "covid"), "--probe-every", str(p["val_every"]),
                       "--lr", str(p["lr"]), "--warmup-steps", str(p["warmup_steps"]), "--num-workers", "1",
                       "--wandb-mode", self.wandb_mode, "--wandb-group", "demo"],
           env={"OMP_NUM_THREADS": "1"} if not self.gpus else None)
        return {"run": str(self.run)}

    def diagnosis(self) -> dict:
        out = self.out / "diagnosis"
        sh([self.py, "launch/downstream.py", "compare", "--shards", str(self.shards / "covid"),
            "--backbones", str(self.run / "encoder.pt"), f"scratch:{self.p['encoder']}",
            "--names", "ssl", "scratch", "--seeds", *map(str, self.p["diag_seeds"]),
            "--image-size", str(self.p["image_size"]), "--epochs", str(self.p["diag_epochs"]),
            "--mode", self.p["diag_mode"], "--unfreeze", str(self.p["diag_unfreeze"]),
            "--scorecam-per-class", str(self.p["scorecam_per_class"]),
            "--out", str(out), "--wandb", self.wandb_mode])
        return {"out": str(out)}

    def severity(self) -> dict:
        out = self.out / "severity"
        sh([self.py, "launch/downstream.py", "severity", "--shards", str(self.shards / "covid"),
            "--backbone", str(self.run / "encoder.pt"), "--features", "pooled",
            "--image-size", str(self.p["image_size"]), "--repeats", str(self.p["severity_repeats"]),
            "--out", str(out), "--wandb", self.wandb_mode])
        return {"out": str(out)}

    def sweep(self) -> dict:
        out = self.out / "sweep"
        sh([self.py, "launch/tune.py", "severity", "--shards", str(self.shards / "covid"),
            "--backbone", str(self.run / "encoder.pt"), "--image-size", str(self.p["image_size"]),
            "--space", "launch/configs/tune_severity.yaml", "--num-samples", str(self.p["sweep_samples"]),
            # our encoder has no named pathology outputs: sweep the kinds of frozen features it has
            "--set", "features={choice: [pooled, multiscale]}",
            "--cpus-per-trial", "1", "--out", str(out), "--wandb-mode", self.wandb_mode])
        return {"out": str(out)}

    STAGES = (
        ("synth", "synthesise phantoms: NIH format (pretraining) and covid-chestxray format (diagnosis, severity)"),
        ("build", "build WebDataset shards"),
        ("pretrain", "DeepSpeed Models Genesis pretraining of a U-Net+CBAM (1 - SSIM)"),
        ("diagnosis", "3-class diagnosis: SSL-initialised encoder against scratch, over seeds, with Score-CAM"),
        ("severity", "severity regression on the frozen pretrained DenseNet encoder"),
        ("sweep", "Ray Tune sweep over the severity head"),
    )


# The preset keys each stage reads: changing one reruns that stage and (through `main`) every later one,
# and leaves earlier finished stages alone.
STAGE_KEYS = {
    "synth": ("n_nih", "n_covid", "synth_size"),
    "build": ("size", "max_count"),
    "pretrain": ("encoder", "image_size", "batch_size", "max_steps", "epoch_size", "checkpoint_every",
                 "val_every", "val_max_samples", "lr", "warmup_steps"),
    "diagnosis": ("diag_epochs", "diag_seeds", "diag_mode", "diag_unfreeze", "scorecam_per_class"),
    "severity": ("severity_repeats",),
    "sweep": ("sweep_samples",),
}


def settings_hash(preset: dict, name: str) -> str:
    own = {k: preset.get(k) for k in STAGE_KEYS[name]}
    return hashlib.sha256(json.dumps([name, own], sort_keys=True).encode()).hexdigest()[:16]


@exit_on_user_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch/demo.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="demo folder (default runs/demo)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default",
                    help="default: the full demo (~15 min on 2 cores); tiny: the CI miniature")
    ap.add_argument("--fresh", action="store_true", help="delete the demo folder and start over")
    ap.add_argument("--wandb-mode", choices=("online", "offline", "disabled"), default=None,
                    help="default: offline unless WANDB_API_KEY is set")
    ap.add_argument("--stop-after", choices=[s for s, _ in Demo.STAGES], help="run the stages up to this one")
    args = ap.parse_args(argv)
    from runkit.tracking import default_wandb_mode

    out = args.out.resolve()
    if args.fresh and out.exists():
        if out == REPO or REPO.is_relative_to(out):
            raise UserError(f"--out {out} contains the repository; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS[args.preset]
    demo = Demo(out, preset, args.wandb_mode or default_wandb_mode())
    state_path = out / "stages.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    device = f"{demo.gpus} GPU(s)" if demo.gpus else "CPU (2 ranks, gloo)"
    print(f"demo: preset {args.preset} on {device}; outputs in {out}", flush=True)
    t_all = time.time()
    n = len(Demo.STAGES)
    for i, (name, title) in enumerate(Demo.STAGES, 1):
        banner(i, n, f"{name}: {title}")
        key = settings_hash(preset, name)
        prev = state.get(name)
        if prev and prev.get("settings") == key and prev.get("done"):
            print(f"reusing the finished stage ({prev['seconds']:.1f} s); `make demo ARGS=--fresh` redoes it")
        else:
            # A stage that changes invalidates every later one.
            for later, _ in Demo.STAGES[i - 1:]:
                state.pop(later, None)
            t0 = time.time()
            outputs = getattr(demo, name)()
            state[name] = {"done": True, "settings": key, "seconds": round(time.time() - t0, 1),
                           "outputs": outputs}
            atomic_write_json(state_path, state)
            print(f"[{i}/{n}] {name} finished in {state[name]['seconds']:.1f} s", flush=True)
        if args.stop_after == name:
            break
    banner(n + 1, n + 1, "report")
    report = write_report(out, state, preset={"name": args.preset, **preset}, device=device)
    print(f"\ndemo: finished in {time.time() - t_all:.1f} s this time; report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
