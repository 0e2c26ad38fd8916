"""Test and fault-injection hooks of the pretraining loop: a no-op by default, kept out of the loop's code.

`Hooks` does nothing. `DebugHooks` is what the hidden `--debug-*` flags turn on, for the fault tests:
per-step sample keys and parameter checksums, optimizer-state checksums at every save and after a resume,
an injected NaN loss on one rank, a real write failure inside DeepSpeed's save on one rank, a collapsed model
(constant output), and kill points (a pause after a step or in the middle of a checkpoint save) at which a
test kill -9s the job, so that where a kill lands does not depend on the machine's speed.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

import torch

from runkit.errors import UserError


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


PAUSE_LIMIT_S = 600  # a debug pause that no test ends with a kill exits the rank (code 70) after this


class DebugHooks(Hooks):
    """The hidden `--debug-*` flags (make_hooks): test and fault-injection hooks, never on in a normal run.

    --debug-keys DIR: per-step sample keys, parameter checksums and optimizer checksums in DIR.
    --debug-nan-at-step N [--debug-nan-rank R]: the loss of step N is NaN on rank R.
    --debug-disk-full-at-step N [--debug-disk-full-rank R]: rank R's writes of the step-N checkpoint hit a
      real full file system's refusal: DeepSpeed's own torch.save runs with the process's file-size limit
      (RLIMIT_FSIZE) at DISK_FULL_BYTES, so the kernel refuses the write past that point and torch raises
      its real error (`RuntimeError: ... unexpected pos ...`, as for ENOSPC), leaving a partial file.
    --debug-pause-at "3,6s,8@1": kill points for tests, each taken once per DIR (recorded in
      DIR/paused_rank<R>.txt, so the same command run again goes past it). "N": every rank stops after the
      update of step N (before its log row and checkpoint); "Ns": rank 0 stops inside the step-N
      checkpoint save, after DeepSpeed wrote its first file (the other ranks wait in DeepSpeed's barrier);
      "@R" makes either point rank R's alone (the others go on to their next collective and wait there).
      A stopped rank appends the point to its paused file and sleeps until it is killed.
    --debug-step-sleep S: sleep S seconds after each step.
    """

    DISK_FULL_BYTES = 64 * 1024

    def __init__(self, args):
        self.dir = Path(args.debug_keys) if args.debug_keys else None
        self.nan_at = args.debug_nan_at_step
        self.nan_rank = args.debug_nan_rank
        self.disk_full_at = args.debug_disk_full_at_step
        self.disk_full_rank = args.debug_disk_full_rank
        self.step_sleep = args.debug_step_sleep
        self.collapse_at = args.debug_collapse_at_step
        self.pauses = _parse_pauses(args.debug_pause_at)
        if self.pauses and self.dir is None:
            raise UserError("--debug-pause-at needs --debug-keys DIR (where each pause is recorded)")
        self._taken: set[str] | None = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def wanted(args) -> bool:
        return bool(args.debug_keys or args.debug_nan_at_step is not None or args.debug_disk_full_at_step is not None
                    or args.debug_step_sleep or args.debug_pause_at or args.debug_collapse_at_step is not None)

    def _append(self, name: str, text: str) -> None:
        if self.dir is not None:
            with open(self.dir / name, "a") as f:
                f.write(text)

    def _pause_point(self, trainer, where: str) -> str | None:
        """The kill point of this rank at `where` ("N" or "Ns") not taken yet, if any."""
        default = trainer.rank == 0 if where.endswith("s") else True
        for point in ((where,) if default else ()) + (f"{where}@{trainer.rank}",):
            if point in self.pauses:
                if self._taken is None:
                    path = self.dir / f"paused_rank{trainer.rank}.txt"
                    self._taken = set(path.read_text().split()) if path.exists() else set()
                if point not in self._taken:
                    return point
        return None

    def _pause(self, trainer, point: str | None) -> None:
        """Stop here until killed (`point` from _pause_point; None: go on)."""
        if point is None:
            return
        path = self.dir / f"paused_rank{trainer.rank}.txt"
        self._taken.add(point)
        with open(path, "a") as f:  # recorded first: the test kills once it reads this line
            f.write(f"{point}\n")
            f.flush()
            os.fsync(f.fileno())
        end = time.monotonic() + PAUSE_LIMIT_S
        while time.monotonic() < end:
            time.sleep(0.05)
        os._exit(70)  # not an exception: inside a save it would pass for a write error

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
        if self.pauses:
            self._pause(trainer, self._pause_point(trainer, str(trainer.step)))

    def after_save(self, trainer, tag: str) -> None:
        s = optimizer_checksum(trainer.engine)
        self._append(f"optim_rank{trainer.rank}.txt", f"saved {tag} {s['exp_avg']!r} {s['exp_avg_sq']!r} "
                                                       f"{s['step']!r} {s['tensors']}\n")

    @contextlib.contextmanager
    def saving(self, trainer, tag: str):
        """Around DeepSpeed's save (outside the engine's write guard): the disk-full and mid-save pause hooks
        wrap the checkpoint engine's `save`, the one call that writes each checkpoint file."""
        ce = trainer.engine.checkpoint_engine
        full = self.disk_full_at == trainer.step and trainer.rank == self.disk_full_rank
        pause = self._pause_point(trainer, f"{trainer.step}s") if self.pauses else None
        if not (full or pause):
            yield
            return
        orig, shadowed = ce.save, "save" in vars(ce)

        def save(*a, **kw):
            if full:
                with _file_size_limit(self.DISK_FULL_BYTES):
                    result = orig(*a, **kw)
            else:
                result = orig(*a, **kw)
            if pause:
                self._pause(trainer, pause)
            return result

        ce.save = save
        try:
            yield
        finally:
            if shadowed:
                ce.save = orig
            else:
                del ce.save


def _parse_pauses(spec: str | None) -> set[str]:
    points = {p.strip() for p in (spec or "").split(",") if p.strip()}
    bad = sorted(p for p in points if not re.fullmatch(r"\d+s?(@\d+)?", p))
    if bad:
        raise UserError(f"--debug-pause-at: {', '.join(bad)}: want points like 3 (after step 3), 6s (in the "
                        "step-6 save) or 3@1 (rank 1 only)")
    return points


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """Writes past `nbytes` of any file fail with EFBIG (SIGXFSZ ignored) while inside; then restored."""
    import resource
    import signal

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def make_hooks(args) -> Hooks:
    return DebugHooks(args) if DebugHooks.wanted(args) else Hooks()
