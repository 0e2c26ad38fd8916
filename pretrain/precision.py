"""Training precision from the DeepSpeed JSON, decided once per job, and the exact fp32 weights for export.

Two ways to train a BatchNorm convnet in 16 bits under DeepSpeed, and what each means here:

* `torch_autocast` (the shipped GPU configs): parameters, BatchNorm statistics and the optimizer stay fp32;
  convolutions and linear layers run in bf16/fp16 inside `torch.autocast`, which DeepSpeed enters in its
  forward. Batch norm runs in fp32, as autocast's op policy has it. The module's parameters *are* the fp32
  master weights (ZeRO-1/2 all-gather the updated fp32 partitions into them), and DeepSpeed communicates
  the conv/linear gradients in the lower precision (`comm_dtype`).
* DeepSpeed's own `bf16` / `fp16` modes: the module's parameters are cast to 16 bits and the fp32 master
  copy lives in the (ZeRO) optimizer. DeepSpeed leaves buffers alone unless `data_types.buffer_dtype` is
  set, which leaves BatchNorm with 16-bit weights and fp32 running statistics: CPU `batch_norm` refuses
  that mix. So the buffers are cast with the parameters (`data_types.buffer_dtype`, DeepSpeed's knob),
  unless the JSON says otherwise, and the input is cast once, before the forward.

Either way `full_fp32_state_dict` returns the fp32 master weights (gathered from the ZeRO partitions
where they live there), which is what `RUN/encoder.pt` holds. ZeRO-3 is refused at start-up: its
parameters live partitioned and the export would need a different gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runkit.errors import UserError

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


@dataclass(frozen=True)
class Precision:
    name: str            # fp32 | bf16 | fp16: the compute precision of convolutions
    how: str             # fp32 | autocast | deepspeed (whole-model cast, fp32 master in the optimizer)
    zero_stage: int

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def input_dtype(self) -> torch.dtype:
        """What the batch is cast to, once, before the forward: autocast casts per op by itself."""
        return self.dtype if self.how == "deepspeed" else torch.float32

    def describe(self) -> dict:
        master = {"fp32": "the module's fp32 parameters", "autocast": "the module's fp32 parameters",
                  "deepspeed": "the optimizer's fp32 master copy"}[self.how]
        return {"precision": self.name, "precision_mode": self.how, "zero_stage": self.zero_stage,
                "export": f"float32, from {master}"}


def _enabled(section) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled")) and section.get("enabled") != "auto"


def resolve(ds_config: dict, device: torch.device) -> Precision:
    """Read (and check) the precision a DeepSpeed JSON asks for; a setting this job cannot run is a UserError."""
    bf16, fp16 = _enabled(ds_config.get("bf16")), _enabled(ds_config.get("fp16"))
    autocast = ds_config.get("torch_autocast")
    use_autocast = _enabled(autocast)
    zero = ds_config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if stage >= 3:
        raise UserError("ZeRO stage 3 is not supported for this ~10-100 M-parameter U-Net (its partitioned "
                        "parameters would need another export path); use stage 0, 1 or 2")
    if bf16 and fp16:
        raise UserError("the DeepSpeed config enables both bf16 and fp16; choose one")
    if use_autocast and (bf16 or fp16):
        raise UserError("the DeepSpeed config enables torch_autocast together with its bf16/fp16 mode; "
                        "choose one (torch_autocast keeps fp32 weights, bf16/fp16 casts the model)")
    if use_autocast:
        key = str(autocast.get("dtype", "bfloat16")).replace("torch.", "")
        if key not in _DTYPES or _DTYPES[key] == torch.float32:
            raise UserError(f"torch_autocast dtype {autocast.get('dtype')!r} must be bfloat16 or float16")
        p = Precision("bf16" if _DTYPES[key] == torch.bfloat16 else "fp16", "autocast", stage)
    elif bf16 or fp16:
        p = Precision("bf16" if bf16 else "fp16", "deepspeed", stage)
    else:
        p = Precision("fp32", "fp32", stage)
    if p.name == "fp16" and device.type == "cpu":
        fp16_cpu = False
        try:
            fp16_cpu = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            pass
        if not fp16_cpu:
            raise UserError("fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 on this CPU); "
                            "use launch/configs/ds_cpu.json or a bf16 config on CPU")
    if p.how == "autocast" and p.name == "fp16" and stage > 0:
        raise UserError("torch_autocast with float16 has a loss scaler only without ZeRO (stage 0) in DeepSpeed; "
                        "use bf16, ZeRO stage 0, or DeepSpeed's fp16 mode with its dynamic loss scale")
    return p


def prepare_ds_config(ds_config: dict, precision: Precision) -> dict:
    """The JSON DeepSpeed gets: BatchNorm buffers follow the parameters under a whole-model 16-bit cast."""
    cfg = dict(ds_config)
    if precision.how == "deepspeed":
        types = dict(cfg.get("data_types") or {})
        types.setdefault("buffer_dtype", precision.name)
        cfg["data_types"] = types
    return cfg


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's state dict with every parameter replaced by its fp32 master value, on the CPU.

    Collective under ZeRO-1/2 (each parameter is all-reduced from the owners of its fragments): call it on
    every rank. Buffers (BatchNorm statistics) come from the module, as float32."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") else None
        if full is None:
            full = _fp16_optimizer_master(engine, p)
        if full is None:
            if p.dtype != torch.float32:
                raise RuntimeError(f"no fp32 master copy found for {name} ({p.dtype})")
            full = p.detach()
        state[name] = full.detach().to("cpu", torch.float32).clone()
    for name, b in module.named_buffers():
        state[name] = b.detach().to("cpu").clone()
        if b.is_floating_point():
            state[name] = state[name].float()
    return state


def _fp16_optimizer_master(engine, param) -> torch.Tensor | None:
    """ZeRO-0 fp16/bf16 (DeepSpeed's FP16_Optimizer): the fp32 copy of `param` in its flat fp32 groups."""
    opt = getattr(engine, "optimizer", None)
    groups16 = getattr(opt, "fp16_groups", None)
    groups32 = getattr(opt, "fp32_groups_flat", None)
    if not groups16 or groups32 is None:
        return None
    for g16, flat in zip(groups16, groups32):
        offset = 0
        for q in g16:
            n = q.numel()
            if q is param:
                return flat.narrow(0, offset, n).view_as(q)
            offset += n
    return None
