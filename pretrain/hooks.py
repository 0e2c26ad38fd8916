"""Test and fault-injection hooks of the pretraining loop: a no-op by default, kept out of the loop's code.

`Hooks` does nothing. `DebugHooks` is what the hidden `--debug-*` flags turn on, for the fault tests:
per-step sample keys and parameter checksums, optimizer-state checksums at every save and after a resume,
an injected NaN loss or full disk, a collapsed model (constant output), sleeps to pace the run, and a pause in the middle of a checkpoint save
so that a test can kill -9 the job there.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

import torch


class Hooks:
    """The no-op hooks every normal run gets."""

    def on_start(self, trainer) -> None:
        pass

    def on_resume(self, trainer, tag: str) -> None:
        pass

    def on_batch(self, trainer, batch: dict) -> None:
        pass

    def on_loss(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_step(self, trainer) -> None:
        pass

    def saving(self, trainer, tag: str):
        return contextlib.nullcontext()

    def after_save(self, trainer, tag: str) -> None:
        pass


def optimizer_checksum(engine) -> dict[str, float]:
    """Sums of the Adam moments and step counts this rank holds (its ZeRO partition, or everything)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    sums = {"exp_avg": 0.0, "exp_avg_sq": 0.0, "step": 0.0, "tensors": 0}
    for state in getattr(opt, "state", {}).values():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            v = state.get(k)
            if v is None:
                continue
            sums[k] += float(v.double().sum()) if torch.is_tensor(v) else float(v)
            sums["tensors"] += k == "exp_avg"
    return sums


class DebugHooks(Hooks):
    def __init__(self, args):
        self.dir = Path(args.debug_keys) if args.debug_keys else None
        self.nan_at = args.debug_nan_at_step
        self.nan_rank = args.debug_nan_rank
        self.enospc_at = args.debug_enospc_at_step
        self.step_sleep = args.debug_step_sleep
        self.ckpt_sleep = args.debug_ckpt_sleep
        self.collapse_at = getattr(args, "debug_collapse_at_step", None)
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def wanted(args) -> bool:
        return bool(args.debug_keys or args.debug_nan_at_step is not None or args.debug_enospc_at_step is not None
                    or args.debug_step_sleep or args.debug_ckpt_sleep
                    or getattr(args, "debug_collapse_at_step", None) is not None)

    def _append(self, name: str, text: str) -> None:
        if self.dir is not None:
            with open(self.dir / name, "a") as f:
                f.write(text)

    def on_start(self, trainer) -> None:
        if self.dir is not None:
            (self.dir / f"pid_rank{trainer.rank}.txt").write_text(str(os.getpid()))

    def on_resume(self, trainer, tag: str) -> None:
        s = optimizer_checksum(trainer.engine)
        self._append(f"optim_rank{trainer.rank}.txt", f"resumed {tag} {s['exp_avg']!r} {s['exp_avg_sq']!r} "
                                                       f"{s['step']!r} {s['tensors']}\n")

    def on_batch(self, trainer, batch: dict) -> None:
        self._append(f"keys_rank{trainer.rank}.txt", "".join(f"{trainer.step} {k}\n" for k in batch.get("key", [])))

    def on_loss(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        if self.nan_at is not None and trainer.step + 1 == self.nan_at and trainer.rank == self.nan_rank:
            return loss * float("nan")
        return loss

    def after_step(self, trainer) -> None:
        if self.collapse_at is not None and trainer.step >= self.collapse_at:
            # a deliberately collapsed model: zero output weights make the restoration sigmoid(bias), whatever
            # the input (done after every step from then on, as the optimizer moves them again)
            with torch.no_grad():
                for p in trainer.engine.module.segmentation_head.parameters():
                    if p.dim() > 1:
                        p.zero_()
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.dir is not None:
            with torch.no_grad():
                s = sum(p.detach().double().sum().item() for p in trainer.engine.module.parameters())
            self._append(f"params_rank{trainer.rank}.txt", f"{trainer.step} {s:.12e}\n")

    def after_save(self, trainer, tag: str) -> None:
        s = optimizer_checksum(trainer.engine)
        self._append(f"optim_rank{trainer.rank}.txt", f"saved {tag} {s['exp_avg']!r} {s['exp_avg_sq']!r} "
                                                       f"{s['step']!r} {s['tensors']}\n")

    @contextlib.contextmanager
    def saving(self, trainer, tag: str):
        """--debug-enospc-at-step: fail like a disk that fills up half way through the checkpoint.
        --debug-ckpt-sleep S: on rank 0, after the first file of a checkpoint is written and before the
        others, DeepSpeed's `latest` and COMPLETE.json, append the tag to ckpt_saving_rank0.txt and sleep S
        seconds, so that a test can kill -9 the job mid-save."""
        if self.enospc_at == trainer.step:
            tag_dir = trainer.ckpt_dir / tag
            tag_dir.mkdir(parents=True, exist_ok=True)
            (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(tag_dir))
        ce = trainer.engine.checkpoint_engine
        if not self.ckpt_sleep or trainer.rank != 0:
            yield
            return
        orig, shadowed, paused = ce.save, "save" in vars(ce), False

        def save(*a, **kw):
            nonlocal paused
            result = orig(*a, **kw)
            if not paused:  # once per checkpoint
                paused = True
                self._append("ckpt_saving_rank0.txt", f"{tag}\n")
                time.sleep(self.ckpt_sleep)
            return result

        ce.save = save
        try:
            yield
        finally:
            if shadowed:
                ce.save = orig
            else:
                del ce.save


def make_hooks(args) -> Hooks:
    return DebugHooks(args) if DebugHooks.wanted(args) else Hooks()
