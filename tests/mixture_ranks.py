"""Run under `deepspeed --num_gpus 2 tests/mixture_ranks.py --spec SPEC --out FILE` (tests/test_mixture.py):
every rank streams the mixture; rank 0 writes each rank's batch count and the mix over all ranks."""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher appends it
    args = p.parse_args()
    # The launcher sets RANK / WORLD_SIZE / MASTER_*; plain gloo avoids DeepSpeed's CPU comm op, a JIT C++
    # build that takes minutes on a fresh machine. What is tested is the launcher's ranks and the stream.
    dist.init_process_group(backend="gloo")
    from shards.stream import make_loader, realised_mix_all_ranks

    rank, world = dist.get_rank(), dist.get_world_size()
    loader = make_loader(args.spec, mode="train", batch_size=4, epoch_size=4 * world * 60, num_workers=2,
                         shuffle_buffer=20, seed=7)
    sizes = [len(b["key"]) for b in loader]
    counts = torch.tensor([len(sizes), min(sizes), max(sizes)])
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    mix = realised_mix_all_ranks(loader)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "ranks": [g.tolist() for g in gathered], "mix": mix,
                       "local": loader.realised_mix(), "env_world": os.environ.get("WORLD_SIZE")}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
