"""DeepSpeed training-step overhead against plain PyTorch, and pretraining images/s per encoder and size.

    python benchmarks/bench_pretrain.py [--batch 8] [--steps 4] [--quick]

Part 1: the same U-Net+CBAM, batch and AdamW, stepped by a DeepSpeed engine (ZeRO stage 0 and 1, fp32,
gradient clipping as in launch/configs/ds_cpu.json) and by a plain `loss.backward(); clip; opt.step()`.
The two are interleaved step by step, so a noisy shared machine slows both alike; medians are compared.
Part 2: full training steps (Genesis corruption + forward + 1-SSIM + backward + step) through DeepSpeed,
images/s for densenet121 and resnet18 at 128 and 224 px. Goal for part 1: at most 5 % overhead.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def _ds_engine(model, zero: int, batch: int):
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "train_batch_size": batch,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": zero}, "steps_per_print": 10 ** 9}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=model.parameters(), config=cfg)
    return engine


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def overhead(encoder: str, size: int, batch: int, steps: int) -> list[dict]:
    from pretrain.loss import RestorationLoss
    from pretrain.model import build_unet

    torch.manual_seed(0)
    base = build_unet(encoder)
    loss_fn = RestorationLoss()
    x = torch.rand(batch, 1, size, size)
    y = torch.rand(batch, 1, size, size)

    plain = copy.deepcopy(base)
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def plain_step():
        loss = loss_fn(plain(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        popt.step()
        popt.zero_grad(set_to_none=True)

    rows = []
    for zero in (0, 1):
        engine = _ds_engine(copy.deepcopy(base), zero, batch)

        def ds_step(engine=engine):
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()

        plain_step(), ds_step()  # warm-up
        tp, td = [], []
        for _ in range(steps):
            tp.append(_time(plain_step))
            td.append(_time(ds_step))
        p, d = statistics.median(tp), statistics.median(td)
        rows.append({"what": f"{encoder} {size}px b{batch} ZeRO-{zero}", "plain_s": p, "ds_s": d,
                     "overhead": d / p - 1})
    return rows


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
    ap.add_argument("--quick", action="store_true", help="resnet18 only, smaller sizes (for smoke tests)")
    a = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pretrain.engine import distributed

    with distributed():
        return _report(a)


def _report(a) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu count {os.cpu_count()}")

    rows = overhead("resnet18", 64 if a.quick else 128, a.batch, a.steps)
    print("\n| DeepSpeed vs plain PyTorch step | plain s/step | DeepSpeed s/step | overhead |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['plain_s']:.3f} | {r['ds_s']:.3f} | {100 * r['overhead']:+.1f} % |")

    sizes = (64,) if a.quick else (128, 224)
    encoders = ("resnet18",) if a.quick else ("resnet18", "densenet121")
    print("\n| encoder | image size | batch | images/s (full DeepSpeed step, ZeRO-1, fp32, CPU) |")
    print("|---|---|---|---|")
    for enc in encoders:
        for size in sizes:
            ips = throughput(enc, size, a.batch, 2)
            print(f"| {enc} | {size} | {a.batch} | {ips:.1f} |", flush=True)
    worst = max(r["overhead"] for r in rows)
    print(f"\nDeepSpeed step overhead vs plain PyTorch: {100 * worst:+.1f} % (worst of ZeRO-0/1; goal <= 5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
