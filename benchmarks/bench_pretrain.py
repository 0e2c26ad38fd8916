"""DeepSpeed training-step overhead against plain PyTorch, and pretraining images/s per encoder and size.

    python benchmarks/bench_pretrain.py [--batch 4] [--steps 3] [--ranks 2] [--quick]

Part 1: the same U-Net+CBAM, batch and AdamW, stepped by a DeepSpeed engine (fp32, gradient clipping as in
launch/configs/ds_cpu.json) and by its PyTorch equivalent, interleaved step by step so that a noisy shared
machine slows both alike; medians are compared.
  a. one process: ZeRO stage 0 against a plain `loss.backward(); clip; opt.step()`. ZeRO-1 on one rank is
     shown too: it has nothing to partition, so it only adds copies into and out of its flat buffers.
  b. `--ranks` local processes (gloo, the CPU's cores split between them): ZeRO-1 and ZeRO-2 against
     torch DistributedDataParallel with the same per-rank batch: what ZeRO is for, data parallelism.
Part 2: full training steps (Genesis corruption + forward + 1-SSIM + backward + step) through DeepSpeed,
images/s for densenet121 and resnet18 at 128 and 224 px. Goal: a DeepSpeed step at most 5 % slower than
a plain PyTorch step for the same model and batch (1a, ZeRO-0); the ZeRO-1/2 costs are reported beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def _ds_engine(model, zero: int, batch: int, world: int = 1):
    import deepspeed

    from pretrain.engine import skip_lone_rank_allreduce

    cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
           "train_batch_size": batch * world,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": zero}, "steps_per_print": 10 ** 9}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=model.parameters(), config=cfg)
    skip_lone_rank_allreduce(engine)                             # as the trainer does
    return engine


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _reference_step(model, loss_fn, x, y):
    """The PyTorch step a DeepSpeed step is compared with: backward, clip, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _against_deepspeed(reference_step, base, loss_fn, x, y, zero_stages, steps: int, world: int = 1,
                       clock=lambda t: t) -> list[tuple[int, float, float]]:
    """(ZeRO stage, median reference s/step, median DeepSpeed s/step), the two stepped alternately."""
    out = []
    for zero in zero_stages:
        engine = _ds_engine(copy.deepcopy(base), zero, x.shape[0], world)

        def ds_step(engine=engine):
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()

        reference_step(), ds_step()  # warm-up
        tp, td = [], []
        for _ in range(steps):
            tp.append(clock(_time(reference_step)))
            td.append(clock(_time(ds_step)))
        out.append((zero, statistics.median(tp), statistics.median(td)))
    return out


def overhead(encoder: str, size: int, batch: int, steps: int) -> list[dict]:
    from pretrain.loss import RestorationLoss
    from pretrain.model import build_unet

    torch.manual_seed(0)
    base = build_unet(encoder)
    loss_fn = RestorationLoss()
    x = torch.rand(batch, 1, size, size)
    y = torch.rand(batch, 1, size, size)
    plain = _reference_step(copy.deepcopy(base), loss_fn, x, y)
    return [{"what": f"{encoder} {size}px b{batch} ZeRO-{zero}", "plain_s": p, "ds_s": d, "overhead": d / p - 1}
            for zero, p, d in _against_deepspeed(plain, base, loss_fn, x, y, (0, 1), steps)]


def data_parallel_overhead(encoder: str, size: int, batch: int, steps: int) -> list[dict]:
    """Run on every rank of a process group: ZeRO-1/2 engines against DDP, step times maxed over ranks."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pretrain.loss import RestorationLoss
    from pretrain.model import build_unet

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = build_unet(encoder)
    loss_fn = RestorationLoss()
    g = torch.Generator().manual_seed(rank)                     # each rank its own batch, as in training
    x = torch.rand(batch, 1, size, size, generator=g)
    y = torch.rand(batch, 1, size, size, generator=g)
    ddp = _reference_step(DistributedDataParallel(copy.deepcopy(base)), loss_fn, x, y)

    def slowest(t: float) -> float:                            # a step lasts until its slowest rank is done
        v = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return float(v)

    return [{"what": f"{encoder} {size}px b{batch}/rank, {world} ranks: ZeRO-{zero} vs DDP", "plain_s": p,
             "ds_s": d, "overhead": d / p - 1}
            for zero, p, d in _against_deepspeed(ddp, base, loss_fn, x, y, (1, 2), steps, world, slowest)]


def _spawn_ranks(a, n: int) -> list[dict]:
    """Part 1b in n local processes, started as the deepspeed launcher would (RANK, WORLD_SIZE, ...)."""
    from pretrain.engine import _free_port

    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // n)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        procs = []
        for r in range(n):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_SIZE=str(n),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                       OMP_NUM_THREADS=str(threads))
            cmd = [sys.executable, __file__, "--rank-worker", str(out), "--batch", str(a.batch),
                   "--steps", str(a.steps)] + (["--quick"] if a.quick else [])
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if r else None))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"bench_pretrain: a rank of the {n}-process run failed (exit codes {codes})")
        return json.loads(out.read_text())


def _rank_worker(a) -> int:
    from pretrain.engine import distributed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with distributed() as (rank, _, _):
        rows = data_parallel_overhead("resnet18", 64 if a.quick else 128, a.batch, a.steps)
        if rank == 0:
            Path(a.rank_worker).write_text(json.dumps(rows))
    return 0


def throughput(encoder: str, size: int, batch: int, steps: int) -> float:
    from pretrain.loss import RestorationLoss
    from pretrain.model import build_unet
    from pretrain.transforms import GenesisConfig, genesis_batch

    torch.manual_seed(0)
    engine = _ds_engine(build_unet(encoder), 1, batch)
    loss_fn = RestorationLoss()
    cfg = GenesisConfig()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size)

    def step():
        corrupted, target = genesis_batch(x, cfg, gen)
        loss = loss_fn(engine(corrupted), target)
        engine.backward(loss)
        engine.step()

    step()
    t = [_time(step) for _ in range(steps)]
    return batch / statistics.median(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2, help="processes for part 1b (ZeRO-1/2 vs DDP); 0 skips it")
    ap.add_argument("--quick", action="store_true", help="resnet18 only, smaller sizes (for smoke tests)")
    ap.add_argument("--rank-worker", metavar="ROWS_JSON", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if a.rank_worker:
        return _rank_worker(a)
    from pretrain.engine import distributed

    with distributed():
        return _report(a)


def _report(a) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu count {os.cpu_count()}")

    rows = overhead("resnet18", 64 if a.quick else 128, a.batch, a.steps)
    print("\n| DeepSpeed vs plain PyTorch step, 1 process | plain s/step | DeepSpeed s/step | overhead |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['plain_s']:.3f} | {r['ds_s']:.3f} | {100 * r['overhead']:+.1f} % |")
    goal_rows = [r for r in rows if "ZeRO-0" in r["what"]]
    dp_rows = []
    if a.ranks > 1:
        dp_rows = _spawn_ranks(a, a.ranks)
        print("\n| DeepSpeed ZeRO vs torch DDP step | DDP s/step | DeepSpeed s/step | overhead |")
        print("|---|---|---|---|")
        for r in dp_rows:
            print(f"| {r['what']} | {r['plain_s']:.3f} | {r['ds_s']:.3f} | {100 * r['overhead']:+.1f} % |")

    sizes = (64,) if a.quick else (128, 224)
    encoders = ("resnet18",) if a.quick else ("resnet18", "densenet121")
    print("\n| encoder | image size | batch | images/s (full DeepSpeed step, ZeRO-1, fp32, CPU) |")
    print("|---|---|---|---|")
    for enc in encoders:
        for size in sizes:
            ips = throughput(enc, size, a.batch, 2)
            print(f"| {enc} | {size} | {a.batch} | {ips:.1f} |", flush=True)
    goal = max(r["overhead"] for r in goal_rows)
    print(f"\nDeepSpeed step overhead vs a plain PyTorch step, same model and batch (ZeRO-0, 1 process): "
          f"{100 * goal:+.1f} % (goal <= 5 %)")
    zero = [r for r in rows if "ZeRO-0" not in r["what"]] + dp_rows
    if zero:
        print("ZeRO >= 1 on CPU (copies into and out of flat buffers, memory-bound here): "
              + ", ".join(f"{r['what'].split(': ')[-1]} {100 * r['overhead']:+.1f} %" for r in zero))
    return 0


if __name__ == "__main__":
    sys.exit(main())
