"""GPU check: the shipped GPU path, measured on the machine it runs on (`make gpu-check`).

    python benchmarks/gpu_check.py [--steps 30] [--batch 32] [--size 224] [--keep DIR]

On a machine with CUDA (at most ~5 minutes on one H200) it:
  1. writes phantom NIH shards (`python -m shards synth` + `build`) at the training size;
  2. pretrains resnet18 and densenet121 U-Nets at --size with launch/configs/ds_zero2_bf16.json on every
     visible GPU (`deepspeed --num_gpus N launch/pretrain.py`), and reads images/s per GPU (log rows after
     the first, so start-up is excluded) and peak GPU memory from RUN/metrics.jsonl;
  3. times the Genesis transforms on one GPU for one micro-batch, against the measured step time;
  4. measures the shard loader (default workers, --size output) on the host against what the GPUs consume;
  5. checks the export: RUN/last/encoder.pt's dtype and its largest difference to DeepSpeed's own fp32
     consolidation (`get_fp32_state_dict_from_zero_checkpoint`) of the last checkpoint;
  6. runs the CUDA-only tests (tests/test_pretrain_cuda.py, tests/test_downstream_cuda.py).
Without CUDA it says so in one line and exits 0 (CI runs that path).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

PY = sys.executable
DS_CONFIG = "launch/configs/ds_zero2_bf16.json"


def _run(cmd: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise SystemExit(f"gpu-check: {' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def make_shards(work: Path, size: int, n: int) -> Path:
    raw, shards = work / "raw", work / "shards"
    _run([PY, "-m", "shards", "synth", "--out", str(raw), "--n-nih", str(n), "--n-covid", "0", "--size", str(size)],
         600)
    _run([PY, "-m", "shards", "build", "nih", "--src", str(raw / "nih"), "--out", str(shards), "--size", str(size),
          "--no-progress"], 600)
    return shards


def pretrain(shards: Path, out: Path, encoder: str, gpus: int, args) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", TQDM_DISABLE="1")
    cmd = [str(Path(PY).parent / "deepspeed"), "--num_gpus", str(gpus), "launch/pretrain.py",
           "--train-shards", f"{shards}/train-*.tar {shards}/test-*.tar", "--out", str(out),
           "--deepspeed_config", DS_CONFIG, "--encoder", encoder, "--image-size", str(args.size),
           "--batch-size", str(args.batch), "--max-steps", str(args.steps), "--epoch-size", str(100_000),
           "--checkpoint-every", str(args.steps), "--log-every", "5", "--warmup-steps", "5",
           "--num-workers", str(args.workers), "--wandb-mode", "disabled"]
    t = time.perf_counter()
    _run(cmd, 400, env)
    wall = time.perf_counter() - t
    rows = [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    steady = rows[1:] or rows
    ips = sum(r["images_per_s"] for r in steady) / len(steady)
    return {"encoder": encoder, "images_per_s": ips, "per_gpu": ips / gpus, "wall_s": wall,
            "peak_gib": max(r.get("gpu_mem_peak_gib", float("nan")) for r in rows),
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def transform_ms(size: int, batch: int, reps: int = 20) -> float:
    from pretrain.transforms import GenesisConfig, genesis_batch

    dev = torch.device("cuda", 0)
    x = torch.rand(batch, 1, size, size, device=dev)
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    cfg = GenesisConfig()
    for _ in range(3):
        genesis_batch(x, cfg, g)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        genesis_batch(x, cfg, g)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def loader_rate(shards: Path, size: int, batch: int, workers: int, batches: int = 60) -> float:
    from shards.stream import make_loader

    loader = make_loader(f"{shards}/train-*.tar", mode="train", batch_size=batch, image_size=size,
                         epoch_size=batch * (batches + 5), num_workers=workers, seed=0, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(5):
        next(it)
    t = time.perf_counter()
    n = 0
    for b in it:
        n += b["image"].shape[0]
    return n / (time.perf_counter() - t)


def export_check(run: Path) -> tuple[str, float]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain import checkpoint as ckpt

    tag = ckpt.latest_complete(run / "checkpoints")[1]
    enc = torch.load(run / "encoder.pt", map_location="cpu", weights_only=True)
    ref = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)
    dtypes = sorted({str(v.dtype) for v in enc.values() if v.is_floating_point()})
    diff = max((v - ref[f"encoder.{k}"].float()).abs().max().item() for k, v in enc.items()
               if v.is_floating_point() and f"encoder.{k}" in ref)
    return ",".join(dtypes), diff


def probe_cost(shards: Path, run: Path, size: int, max_samples: int = 1000) -> tuple[int, float]:
    """Seconds of one online probe (`pretrain.probes`) as the trainer runs it on the GPU: bf16-autocast
    features of up to `max_samples` labelled images, then the CPU probes."""
    from pretrain.model import load_encoder
    from pretrain.probes import encoder_features, fit_probes, load_probe_set

    data = load_probe_set(f"{shards}/*.tar", image_size=size, max_samples=max_samples)
    encoder, _ = load_encoder(run)
    encoder = encoder.to("cuda")
    fit_probes(encoder_features(encoder, data.images[:64], device=torch.device("cuda"),
                                autocast_dtype=torch.bfloat16), type(data)(data.images[:64], data.targets[:64],
                                                                           data.groups[:64]))  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    fit_probes(encoder_features(encoder, data.images, device=torch.device("cuda"), autocast_dtype=torch.bfloat16),
               data)
    return len(data), time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32, help="micro-batch per GPU")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=512, help="phantom images to shard")
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank (the trainer's default)")
    p.add_argument("--encoders", default="resnet18,densenet121")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA-only pytest files")
    p.add_argument("--keep", type=Path, default=None, help="keep the work folder here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible here; nothing measured (run `make gpu-check` on a GPU machine)")
        return 0
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {gpus} x {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, config {DS_CONFIG}, "
          f"{args.size} px, micro-batch {args.batch}/GPU, {args.steps} steps", flush=True)
    t0 = time.perf_counter()
    shards = make_shards(work, args.size, args.images)
    results = [pretrain(shards, work / f"run_{enc}", enc, gpus, args) for enc in args.encoders.split(",")]
    t_ms = transform_ms(args.size, args.batch)
    load = loader_rate(shards, args.size, args.batch, args.workers)
    print("\n| encoder | images/s (all GPUs) | images/s per GPU | step ms | Genesis ms | Genesis share | "
          "peak GPU GiB | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        step_ms = args.batch / r["per_gpu"] * 1e3
        print(f"| {r['encoder']} | {r['images_per_s']:.0f} | {r['per_gpu']:.0f} | {step_ms:.1f} | {t_ms:.1f} | "
              f"{100 * t_ms / step_ms:.1f} % (goal < 5 %) | {r['peak_gib']:.2f} | "
              f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    need = max(r["images_per_s"] for r in results) / gpus
    print(f"\nloader, {args.workers} workers, {args.size} px out: {load:.0f} images/s on the host; one GPU consumes "
          f"up to {need:.0f} images/s -> {'enough' if load >= need else f'short by {need / load:.1f}x'}")
    for r in results:
        dtypes, diff = export_check(work / f"run_{r['encoder']}")
        print(f"export {r['encoder']}: encoder.pt dtype {dtypes}; max |encoder.pt - zero_to_fp32| = {diff:.3g}")
    for r in results:
        n, sec = probe_cost(shards, work / f"run_{r['encoder']}", args.size)
        step_s = args.batch / r["per_gpu"]
        print(f"online probe {r['encoder']}: {sec:.1f} s for {n} images; at the default --probe-every 500 "
              f"({500 * step_s:.0f} s of training) that is {100 * sec / (500 * step_s):.1f} % (goal <= 10 %)")
    print(f"gpu-check: measurements took {time.perf_counter() - t0:.0f} s", flush=True)
    rc = 0
    if not args.no_tests:
        r = subprocess.run([PY, "-m", "pytest", "-q", "tests/test_pretrain_cuda.py", "tests/test_downstream_cuda.py"],
                           cwd=REPO, check=False)
        rc = r.returncode
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
