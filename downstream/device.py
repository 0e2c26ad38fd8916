"""Device and precision for downstream jobs, decided once per job (by launch/ or the sweep driver) and
passed down; nothing below guesses.

- `parse_device("auto" | "cpu" | "cuda" | "cuda:i")`: auto is the first GPU when there is one;
  asking for CUDA without it (or an index past the last GPU) is a UserError.
- `autocast(device)`: bf16 autocast on CUDA, nothing on CPU (float32 there).
- `to_float(x, device)`: uint8 batches move to the device first (4x fewer bytes), then become [0,1] floats.
"""
from __future__ import annotations

import contextlib
import re

import torch

from runkit.errors import UserError

_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_spec(spec) -> str | None:
    """Config-field check: the text of a device spec, before any hardware is looked at."""
    return None if _SPEC.match(str(spec)) else f"device must be auto, cpu, cuda or cuda:N, got {spec!r}"


def parse_device(spec: str | torch.device | None = "auto") -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    spec = str(spec or "auto").strip()
    problem = check_spec(spec)
    if problem:
        raise UserError(problem)
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {spec}: CUDA is not available here (use --device cpu or auto)")
    dev = torch.device(spec)
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise UserError(f"device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [0,255] (uint16 [0,65535]) -> float32 [0,1] on `device`, moving the small integer tensor first."""
    from shards.stream import images_to_float

    return images_to_float(x, device)


def trial_device(gpus_per_trial: float) -> str:
    """Inside a Ray trial: CUDA when Ray gave this trial a GPU (Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    if gpus_per_trial and gpus_per_trial > 0:
        try:
            import ray

            if ray.get_gpu_ids() and torch.cuda.is_available():
                return "cuda"
        except Exception:  # noqa: BLE001, S110 - outside a Ray worker: CUDA below decides
            pass
        if torch.cuda.is_available():
            return "cuda"
    return "cpu"
