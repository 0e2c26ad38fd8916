"""DeepSpeed training loop for Models Genesis restoration: train, validate, checkpoint, export, log.

Step-based: `--max-steps` optimizer steps; the streamed loader is rebuilt every `--epoch-size` samples.
Batch sizes: `--batch-size` is the micro-batch per rank; gradient accumulation comes from the DeepSpeed
JSON; `train_batch_size` is derived as micro * accumulation * world size. A JSON that states a different
`train_batch_size` is a UserError rather than a silent override. The learning rate is `--lr` at an
effective batch of 256, scaled linearly: lr = base_lr * effective_batch / 256.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pretrain import checkpoint as ckpt
from runkit.allocator import keep_freed_memory
from runkit.errors import UserError

DEFAULT_DS_CONFIG = "launch/configs/ds_cpu.json"
VAL_SEED = 20240601
MEAN_IMAGE_SAMPLES = 256  # training images averaged for the mean-image validation baseline


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss: training stops on every rank, after a diagnostic dump."""


# ----------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/pretrain.py",
        description="Models Genesis restoration pretraining of a U-Net+CBAM on DeepSpeed.")
    a = p.add_argument
    a("--config", help="experiment YAML; its keys are these flags, explicit flags win")
    a("--train-shards", help="shard list, glob or brace pattern of the training shards")
    a("--val-shards", default=None, help="validation shards (optional)")
    a("--out", help="run folder; an existing one is resumed from its last complete checkpoint")
    a("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
      help=f"DeepSpeed JSON (default {DEFAULT_DS_CONFIG} on CPU, launch/configs/ds_zero2_bf16.json on GPU)")
    a("--encoder", default="densenet121", help="smp encoder: densenet121, resnet18/34/50 or tu-<timm name>")
    a("--image-size", type=int, default=224, help="side in px, a multiple of 32")
    a("--batch-size", type=int, default=None, help="micro-batch per rank (default: from the DeepSpeed JSON)")
    a("--max-steps", type=int, default=1000, help="optimizer steps in total (the lr schedule's length)")
    a("--max-minutes", type=float, default=None,
      help="wall-clock budget: stop early (validate, checkpoint, export) once it is spent")
    a("--epoch-size", type=int, default=10000, help="samples per streamed epoch (all ranks together)")
    a("--checkpoint-every", type=int, default=500)
    a("--keep-last", type=int, default=2, help="complete checkpoints kept")
    a("--lr", type=float, default=1e-3, help="base learning rate at an effective batch of 256")
    a("--weight-decay", type=float, default=1e-4)
    a("--warmup-steps", type=int, default=100)
    a("--min-lr-ratio", type=float, default=0.01, help="final lr as a fraction of the peak")
    a("--loss", default="ssim", choices=["ssim", "ms-ssim", "ssim+l1"])
    a("--l1-weight", type=float, default=0.1)
    a("--cbam-encoder", action=argparse.BooleanOptionalAction, default=False)
    a("--cbam-decoder", action=argparse.BooleanOptionalAction, default=True)
    a("--genesis", type=json.loads, default=None,
      help="Genesis transform settings as JSON (or a mapping under `genesis:` in the YAML)")
    a("--val-every", type=int, default=500)
    a("--val-max-samples", type=int, default=None, help="cap on validation samples per evaluation")
    a("--log-every", type=int, default=10)
    a("--probe-shards", default=None,
      help="labelled shards (diagnosis, NIH findings and/or severity) for online probes of the frozen encoder: "
           "at step 0 (the random-init reference) and every --probe-every steps; see pretrain/probes.py")
    a("--probe-every", type=int, default=500)
    a("--probe-max-samples", type=int, default=1000, help="probe images kept (whole patients, a seeded draw)")
    a("--probe-folds", type=int, default=5, help="patient-grouped cross-validation folds of the probes")
    a("--collapse-ratio", type=float, default=0.05,
      help="warn when restorations vary across a batch less than this fraction of the originals (pretrain/validation.py)")
    a("--seed", type=int, default=0)
    a("--num-workers", type=int, default=2)
    a("--shuffle-buffer", type=int, default=1000)
    a("--wandb-project", default="xray-genesis")
    a("--wandb-group", default=None)
    a("--wandb-name", default=None)
    a("--wandb-mode", default=None, choices=["online", "offline", "disabled"],
      help="default: offline unless WANDB_API_KEY is set")
    a("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # accepted for DeepSpeed-style command lines
    a("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    # Fault injection and test hooks; hidden from --help.
    a("--debug-keys", default=None, help=argparse.SUPPRESS)
    a("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)
    a("--debug-nan-rank", type=int, default=0, help=argparse.SUPPRESS)
    a("--debug-disk-full-at-step", type=int, default=None, help=argparse.SUPPRESS)
    a("--debug-disk-full-rank", type=int, default=0, help=argparse.SUPPRESS)
    a("--debug-pause-at", default=None, help=argparse.SUPPRESS)  # "3,6s": see pretrain.hooks
    a("--debug-step-sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    a("--debug-collapse-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks of user input, before any process group or model exists."""
    from pretrain.model import check_encoder_name

    for flag in ("train_shards", "out"):
        if not getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} is required")
    if args.image_size <= 0 or args.image_size % 32:
        raise UserError(f"--image-size {args.image_size} must be a positive multiple of 32 (the U-Net downsamples 5 times)")
    for flag in ("max_steps", "epoch_size", "checkpoint_every", "keep_last", "val_every", "log_every",
                 "probe_every", "probe_max_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.probe_folds < 2:
        raise UserError(f"--probe-folds must be at least 2, got {args.probe_folds}")
    if args.genesis is not None and not isinstance(args.genesis, dict):
        raise UserError("--genesis must be a mapping of transform settings")
    make_corruptor(args.genesis)
    check_encoder_name(args.encoder)
    if args.loss == "ms-ssim":
        from pretrain.loss import RestorationLoss

        RestorationLoss("ms-ssim", image_size=args.image_size)


def load_ds_config(path: str | None, *, micro_batch: int | None, world_size: int) -> dict:
    """Read the DeepSpeed JSON and fill in the batch sizes; an inconsistent train_batch_size is a UserError."""
    if path is None:
        path = "launch/configs/ds_zero2_bf16.json" if torch.cuda.is_available() else DEFAULT_DS_CONFIG
    p = Path(path)
    if not p.is_file():
        raise UserError(f"DeepSpeed config {p} does not exist")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"DeepSpeed config {p} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {p} must be a JSON object")
    cfg = _strip_comments(cfg)
    cfg_micro = cfg.get("train_micro_batch_size_per_gpu")
    micro = micro_batch or (cfg_micro if isinstance(cfg_micro, int) else None) or 16
    accum = cfg.get("gradient_accumulation_steps", 1)
    if accum == "auto":
        accum = 1
    if not isinstance(accum, int) or accum < 1:
        raise UserError(f"DeepSpeed config {p}: gradient_accumulation_steps must be a positive integer")
    effective = micro * accum * world_size
    stated = cfg.get("train_batch_size")
    if stated not in (None, "auto") and stated != effective:
        raise UserError(f"DeepSpeed config {p}: train_batch_size {stated} != micro batch {micro} x "
                        f"gradient_accumulation_steps {accum} x world size {world_size} = {effective}; "
                        "remove train_batch_size to derive it")
    if cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"):
        raise UserError(f"DeepSpeed config {p}: bf16 and fp16 cannot both be enabled")
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = effective
    cfg.setdefault("steps_per_print", 10 ** 9)  # we print our own loss lines
    return cfg


def _strip_comments(obj):
    """Our JSONs explain themselves in "_comment" keys, which DeepSpeed must not see."""
    if isinstance(obj, dict):
        return {k: _strip_comments(v) for k, v in obj.items() if not str(k).startswith("_comment")}
    return obj


# ------------------------------------------------------------------------------------- distributed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def distributed():
    """Join the launcher's process group, or make a 1-process one for `python launch/pretrain.py`.

    Yields (rank, world, local_rank). A group (and environment) this made is undone on exit, so an
    in-process caller such as a test or a notebook is left as it was."""
    import deepspeed
    import torch.distributed as dist

    saved_env = dict(os.environ)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    owned = not dist.is_initialized()
    if owned:
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    try:
        yield dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
            _forget_deepspeed_groups()
        os.environ.clear()
        os.environ.update(saved_env)


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals; after the group is destroyed they would point at
    a dead group, and the next in-process run (a test, a notebook cell) would fail to broadcast with them."""
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)


def _all_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank (a collective)."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return [obj]
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def skip_lone_rank_allreduce(engine) -> bool:
    """A ZeRO-0 engine on one rank all-reduces its gradients with nobody: DeepSpeed still flattens every
    gradient into buckets and copies it back (~2 passes over the gradients, +5-20 % of a small CPU step).
    Turn that off when there is nothing to reduce; ZeRO >= 1 reduces inside its optimizer, so it is kept.
    Returns whether it was turned off."""
    import torch.distributed as dist

    if engine.zero_optimization_stage() == 0 and dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False
        return True
    return False


# -------------------------------------------------------------------------------------- transforms

def make_corruptor(genesis: dict | None):
    """(x, generator) -> (corrupted, target); an unknown or bad Genesis option is a UserError now."""
    from pretrain.transforms import GenesisConfig, genesis_batch

    cfg = GenesisConfig.from_dict(genesis)
    return lambda x, g: genesis_batch(x, cfg, g)


# --------------------------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> int:
    """Entry point after argument parsing: returns the process exit code."""
    check_args(args)
    keep_freed_memory()                     # CPU steps reuse freed batch-sized blocks instead of page-faulting
    from shards.stream import expand_urls

    train_urls = expand_urls(args.train_shards)
    val_urls = expand_urls(args.val_shards) if args.val_shards else []
    if args.probe_shards:
        from downstream.data import shard_urls

        shard_urls(args.probe_shards)  # folders too, as downstream jobs take; a bad spec fails before any process group
    with distributed() as (rank, world, local_rank):
        ds_config = load_ds_config(args.deepspeed_config, micro_batch=args.batch_size, world_size=world)
        trainer = Trainer(args, ds_config, train_urls, val_urls, rank, world, local_rank)
        try:
            trainer.train()
        except NonFiniteLoss as exc:
            print(f"pretrain: error: {exc}", file=sys.stderr, flush=True)
            return 3
        finally:
            trainer.close()
    return 0


class Trainer:
    def __init__(self, args, ds_config, train_urls, val_urls, rank, world, local_rank):
        import deepspeed

        from pretrain.hooks import make_hooks
        from pretrain.loss import RestorationLoss
        from pretrain.model import build_unet
        from pretrain.precision import prepare_ds_config, resolve
        from pretrain.validation import CollapseCheck
        from runkit.config import save_resolved
        from runkit.tracking import Tracker, persistent_run_id

        self.args, self.rank, self.world = args, rank, world
        self.train_urls, self.val_urls = train_urls, val_urls
        self.out = Path(args.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.hooks = make_hooks(args)
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve(ds_config, self.device)
        torch.manual_seed(args.seed)  # identical initial weights on every rank

        micro = ds_config["train_micro_batch_size_per_gpu"]
        accum = ds_config["gradient_accumulation_steps"]
        self.micro, self.accum = micro, accum
        self.effective_batch = ds_config["train_batch_size"]
        self.lr = args.lr * self.effective_batch / 256.0
        ds_config = prepare_ds_config(copy.deepcopy(ds_config), self.precision)
        ds_config["scheduler"] = scheduler_config(args)
        self.model = build_unet(args.encoder, cbam_decoder=args.cbam_decoder, cbam_encoder=args.cbam_encoder)
        if "optimizer" in ds_config:  # a DeepSpeed optimizer named in the JSON; lr and weight decay are always ours
            ds_config["optimizer"].setdefault("params", {}).update(lr=self.lr, weight_decay=args.weight_decay)
            optimizer = None
        else:  # torch's AdamW: its fused kernel on GPU (no JIT-built op needed), the default one on CPU
            optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=args.weight_decay,
                                          fused=self.device.type == "cuda")
        self.ds_config = ds_config
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                    model_parameters=self.model.parameters(),
                                                    config=ds_config)
        skip_lone_rank_allreduce(self.engine)
        self.loss_fn = RestorationLoss(args.loss, args.l1_weight, image_size=args.image_size)
        self.corrupt = make_corruptor(args.genesis)

        self.step, self.samples_seen, self.best = 0, 0, None
        self.resumed_from = None
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_resolved({**vars(args), "world_size": world, "micro_batch": micro,
                           "gradient_accumulation_steps": accum, "effective_batch": self.effective_batch,
                           "scaled_lr": self.lr, **self.precision.describe(), "deepspeed": ds_config}, self.out)
            print(f"pretrain: {world} rank(s) on {self.device.type}, {self.precision.name} "
                  f"({self.precision.how}), ZeRO {self.precision.zero_stage}; micro-batch {micro} x accumulation "
                  f"{accum} x {world} ranks = effective batch {self.effective_batch}, peak lr {self.lr:.3e} "
                  f"(--lr {args.lr:g} x {self.effective_batch}/256)", flush=True)
        self._resume()
        self.tracker = Tracker(self.out, config={**vars(args), "effective_batch": self.effective_batch,
                                                 "scaled_lr": self.lr, **self.precision.describe()},
                               enabled=rank == 0, project=args.wandb_project, group=args.wandb_group,
                               name=args.wandb_name, mode=args.wandb_mode, job_type="pretrain",
                               resume_id=persistent_run_id(self.out) if rank == 0 else None)
        self.collapse = CollapseCheck(args.max_steps, ratio=args.collapse_ratio)
        self._mean_image = None
        self.probing = bool(args.probe_shards)
        self.probe = None
        if self.probing and rank == 0:
            from pretrain.probes import OnlineProbe

            self.probe = OnlineProbe(args.probe_shards, every=args.probe_every, image_size=args.image_size,
                                     max_samples=args.probe_max_samples, folds=args.probe_folds, seed=args.seed,
                                     out_dir=self.out)
        self.hooks.on_start(self)

    # -------------------------------------------------------------------------------- checkpoints

    def _resume(self) -> None:
        found = ckpt.latest_complete(self.ckpt_dir) if self.rank == 0 else None
        found = _broadcast(found)
        if found is None:
            return
        _, tag, info = found
        zero = self.engine.zero_optimization_stage()
        saved_zero = info.get("zero_stage", zero)
        if (zero > 0 or saved_zero > 0) and info.get("world_size") not in (None, self.world):
            raise UserError(f"checkpoint {self.ckpt_dir / tag} was written by {info['world_size']} ranks with "
                            f"ZeRO stage {saved_zero}, and ZeRO partitions do not load at another rank count; "
                            f"resume with {info['world_size']} ranks (this job has {self.world})")
        load_path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.ckpt_dir / tag}")
        self.step = int(client["step"])
        self.samples_seen = int(client["samples_seen"])
        self.best = client.get("best_val_ssim")
        if self.engine.global_steps != self.step:
            raise RuntimeError(f"checkpoint {tag}: engine step {self.engine.global_steps} != saved step {self.step}")
        self.resumed_from = tag
        self.hooks.on_resume(self, tag)
        if self.rank == 0:
            print(f"pretrain: resumed from {self.ckpt_dir / tag} at step {self.step} "
                  f"({self.samples_seen} samples seen)", flush=True)

    def save_checkpoint(self) -> bool:
        """Save on all ranks; rank 0 marks the tag complete after a barrier, then prunes old tags.

        A write error on any rank (ckpt.WRITE_ERRORS) skips the tag on every rank: returns False."""
        import torch.distributed as dist

        tag = ckpt.tag_for(self.step)
        client = {"step": self.step, "samples_seen": self.samples_seen, "data_seed": self.args.seed,
                  "best_val_ssim": self.best, "effective_batch": self.effective_batch, "lr": self.lr}
        # A failed write (full disk, I/O error) is recorded on its rank, not raised, so every rank runs the
        # rest of DeepSpeed's save, then the ranks agree: one failure skips the checkpoint everywhere.
        with self.hooks.saving(self, tag), ckpt.catch_write_errors(self.engine) as errors:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        failures = _gather(f"rank {self.rank}: {errors[0]!r}" if errors else None)
        failures = [f for f in failures if f is not None]
        if failures:
            if self.rank == 0:
                ckpt.remove_partial(self.ckpt_dir, tag)
                prev = ckpt.latest_complete(self.ckpt_dir)
                msg = (f"pretrain: warning: checkpoint {tag} not saved, a write failed ({'; '.join(failures)}); "
                       f"its partial files are deleted; ")
                msg += f"the last complete checkpoint is {prev[1]}" if prev else "there is no complete checkpoint yet"
                print(msg + "; training goes on", file=sys.stderr, flush=True)
            return False
        self.hooks.after_save(self, tag)
        dist.barrier()
        if self.rank == 0:
            try:
                ckpt.mark_complete(self.ckpt_dir, tag, {"step": self.step, "world_size": self.world,
                                                        "zero_stage": self.engine.zero_optimization_stage(),
                                                        "precision": self.precision.name})
                ckpt.prune(self.ckpt_dir, self.args.keep_last)
            except OSError as exc:
                ckpt.remove_partial(self.ckpt_dir, tag)
                print(f"pretrain: warning: checkpoint {tag} could not be completed ({exc})", file=sys.stderr)
        dist.barrier()
        return True

    # ----------------------------------------------------------------------------------- training

    def _train_loader(self, consumed: int):
        """The loader positioned at micro-batch `consumed` of this rank's stream: (its epoch, batches to skip).

        One stream seed per run; the epoch number orders shards and samples (shards.stream), so the stream
        is a fixed sequence of epochs of `len(loader)` batches and a resumed run continues it exactly where
        the checkpoint left it. The skipped batches are read and decoded again (at most one epoch's)."""
        from shards.stream import make_loader

        loader = make_loader(self.train_urls, mode="train", batch_size=self.micro, image_size=self.args.image_size,
                             epoch_size=self.args.epoch_size, num_workers=self.args.num_workers,
                             shuffle_buffer=self.args.shuffle_buffer, seed=self.args.seed, rank=self.rank,
                             world_size=self.world)
        epoch, skip = divmod(consumed, len(loader))
        loader.set_epoch(epoch)
        return loader, skip

    def _sync_due(self, last: bool) -> bool:
        """Steps at which the host reads the device: logging, validation, checkpoints and the last step."""
        a, s = self.args, self.step
        return (last or s % a.log_every == 0 or s % a.checkpoint_every == 0
                or bool(self.val_urls and s % a.val_every == 0) or bool(self.probing and s % a.probe_every == 0))

    def train(self) -> None:
        """The loop reads nothing back from the device between sync steps (`_sync_due`): the loss, the count
        of non-finite losses and the first bad step accumulate on the device, and one all-reduce at a sync
        step turns them into the log row, the NaN stop and the wall-clock stop together."""
        import torch.distributed as dist
        from tqdm import tqdm

        from shards.stream import images_to_float

        args = self.args
        gen = torch.Generator(device=self.device)  # reseeded per micro-batch from its position (_batch_seed)
        consumed = self.step * self.accum  # micro-batches this rank has trained on; a checkpoint ends a step
        bar = tqdm(total=args.max_steps, initial=self.step, desc="pretrain", unit="step",
                   disable=self.rank != 0, dynamic_ncols=True, file=sys.stdout)
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, micro-steps, non-finite count
        first_bad = torch.full((), math.inf, dtype=torch.float64, device=self.device)
        t0, imgs, t_start = time.perf_counter(), 0, time.perf_counter()
        in_dtype = self.precision.input_dtype
        self.out_of_time = False
        self._t_train, self._t_probes = time.perf_counter(), 0.0
        if self.probing and self.step == 0:
            self._probe()  # the random-init reference
        self.engine.train()
        # one loader for the run, positioned where the checkpoint left the stream; it advances its epoch
        # after each pass, and its workers persist across epochs
        loader, skip = self._train_loader(consumed)
        while self.step < args.max_steps and not self.out_of_time:
            n_batches = 0
            for batch in loader:
                n_batches += 1
                if n_batches <= skip:
                    continue  # resumed mid-epoch: trained on before the restart
                gen.manual_seed(_batch_seed(args.seed, self.rank, consumed))
                consumed += 1
                self.hooks.on_batch(self, batch)
                x = images_to_float(batch["image"], self.device)  # uint8 moved, converted on the device
                with torch.no_grad():
                    corrupted, target = self.corrupt(x, gen)
                out = self.engine(corrupted.to(in_dtype))
                loss = self.hooks.on_loss(self, self.loss_fn(out.float(), target))
                with torch.no_grad():
                    d = loss.detach().double()
                    finite = torch.isfinite(d)
                    acc += torch.stack([torch.where(finite, d, 0.0), torch.ones_like(d), (~finite).double()])
                    first_bad = torch.where(finite, first_bad, torch.clamp(first_bad, max=float(self.step + 1)))
                self.engine.backward(loss)
                lr_used = self.engine.get_lr()[0]  # a host value; the scheduler moves on inside step()
                self.engine.step()
                imgs += x.shape[0] * self.world
                if self.engine.global_steps == self.step:
                    continue  # inside a gradient accumulation window
                self.step = self.engine.global_steps
                self.samples_seen += self.effective_batch
                bar.update(1)
                self.hooks.after_step(self)
                last = self.step >= args.max_steps
                if not self._sync_due(last):
                    continue
                out_of_time = (self.rank == 0 and args.max_minutes is not None
                               and time.perf_counter() - t_start > 60 * args.max_minutes)
                total = _all_reduce_stats(acc, first_bad, out_of_time)
                if total["bad"] > 0:
                    dump = self._nan_dump(total, loss, batch, x, corrupted, out)
                    dist.barrier()  # no rank exits (and has the launcher kill the others) before every dump is written
                    raise NonFiniteLoss(f"non-finite loss at step {total['first_bad_step']} on "
                                        f"{int(total['bad'])} micro-step(s) over the ranks (seen at step "
                                        f"{self.step}); diagnostics in {dump}")
                dt = time.perf_counter() - t0
                row = {"loss": total["loss_sum"] / max(1.0, total["micro_steps"]), "lr": lr_used, "peak_lr": self.lr,
                       "images_per_s": imgs / max(dt, 1e-9), "samples_seen": self.samples_seen,
                       "effective_batch": self.effective_batch, "gradient_accumulation_steps": self.accum,
                       "epoch": self.samples_seen / args.epoch_size}
                if self.device.type == "cuda":  # a host-side counter: no device sync
                    row["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                row.update(loader.mix_metrics())  # mix/<group>: realised share of each source this epoch (rank 0)
                self.tracker.log(row, step=self.step)
                if self.rank == 0:
                    bar.write(f"step {self.step:>7d}  loss {row['loss']:.4f}  lr {row['lr']:.3e}  "
                              f"{row['images_per_s']:.1f} img/s")
                acc.zero_()
                t0, imgs = time.perf_counter(), 0
                self.out_of_time = total["out_of_time"] > 0
                last = last or self.out_of_time
                if self.val_urls and (self.step % args.val_every == 0 or last):
                    self.validate()
                    self.engine.train()
                if self.probing and (self.step % args.probe_every == 0 or last):
                    self._probe()
                    self.engine.train()
                if self.step % args.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if last:
                    break
            skip = 0  # only the resumed epoch starts part way
            if n_batches == 0:
                raise UserError(f"the training shards gave no batch of {self.micro} per rank "
                                f"(--epoch-size {args.epoch_size}, {self.world} ranks)")
        bar.close()
        if self.probe is not None and self.probe.count:
            spent = time.perf_counter() - self._t_train - self._t_probes
            print(f"pretrain: probes: {self.probe.count} run(s), {self.probe.seconds:.1f} s in all, "
                  f"{100 * self.probe.seconds / max(spent, 1e-9):.1f} % of the {spent:.1f} s of training", flush=True)
        if self.out_of_time and self.rank == 0:
            print(f"pretrain: --max-minutes {args.max_minutes:g} spent; stopped at step {self.step} "
                  f"of {args.max_steps}", flush=True)
        self._export_final()

    def _nan_dump(self, total: dict, loss, batch, x, corrupted, out) -> Path:
        """Every rank writes its own view; rank 0's is nan_dump.json, others nan_dump_rank<R>.json."""
        from runkit.atomic import atomic_write_json

        def stats(t):
            t = t.detach().float()
            return {"shape": list(t.shape), "min": _f(t.min()), "max": _f(t.max()), "mean": _f(t.mean()),
                    "nonfinite": int((~torch.isfinite(t)).sum())}

        dump = {"step": total["first_bad_step"], "detected_at_step": self.step, "rank": self.rank,
                "nonfinite_micro_steps_all_ranks": int(total["bad"]),
                "loss": str(loss.item()),  # this rank's loss at the step the stop was seen
                "keys": list(batch.get("key", [])), "batch_fields": sorted(batch),
                "input": stats(x), "corrupted": stats(corrupted), "output": stats(out),
                "lr": self.engine.get_lr()[0], "samples_seen": self.samples_seen,
                "nonfinite_params": [n for n, p in self.engine.module.named_parameters()
                                     if not torch.isfinite(p).all()][:20]}
        name = "nan_dump.json" if self.rank == 0 else f"nan_dump_rank{self.rank}.json"
        return atomic_write_json(self.out / name, dump)

    # --------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> dict:
        """Restoration SSIM/PSNR beside the identity, blur and mean-image baselines, and the collapse check
        (pretrain/validation.py); the same corruption at every evaluation."""
        from pretrain.validation import RestorationStats
        from shards.stream import images_to_float, make_loader

        mean_image = self._mean_train_image()
        self.engine.eval()
        loader = make_loader(self.val_urls, mode="eval", batch_size=self.micro, image_size=self.args.image_size,
                             num_workers=min(self.args.num_workers, 1), rank=self.rank, world_size=self.world)
        cap = self.args.val_max_samples
        cap_rank = None if cap is None else -(-cap // self.world)
        stats = RestorationStats(self.device)
        grid = None
        seen = 0
        for i, batch in enumerate(loader):
            if cap_rank is not None and seen >= cap_rank:
                break
            x = images_to_float(batch["image"], self.device)
            if cap_rank is not None:
                x = x[: cap_rank - seen]
            seen += x.shape[0]
            gen = torch.Generator(device=self.device)
            gen.manual_seed(VAL_SEED + 1000 * self.rank + i)  # same corruption at every evaluation
            corrupted, target = self.corrupt(x, gen)
            restored = self.engine(corrupted.to(self.precision.input_dtype)).float()  # the engine's autocast
            stats.add(restored, corrupted, target, mean_image)
            if grid is None and self.rank == 0:
                grid = (target[:8].cpu(), corrupted[:8].float().cpu(), restored[:8].cpu())
        metrics = stats.reduce(_all_sum)
        improved = metrics["val/count"] > 0 and (self.best is None or metrics["val/ssim"] > self.best)
        if improved:
            self.best = metrics["val/ssim"]
        metrics["val/best_ssim"] = self.best
        warning = self.collapse.check(self.step, metrics)  # the same numbers on every rank
        if warning:
            metrics["val/collapse_warning"] = 1
        if self.rank == 0:
            self.tracker.log(metrics, step=self.step)
            print(f"val step {self.step}: restored SSIM {metrics['val/ssim']:.4f} PSNR {metrics['val/psnr']:.2f} | "
                  f"identity {metrics['val/ssim_identity']:.4f}, blur (sigma {metrics['val/blur_sigma']:g}) "
                  f"{metrics['val/ssim_blur']:.4f}, mean image {metrics['val/ssim_mean_image']:.4f} | margin "
                  f"{metrics['val/ssim_margin']:+.4f}, spread ratio {metrics['val/spread_ratio']:.3f} "
                  f"(n={metrics['val/count']})", flush=True)
            if warning:
                print(f"pretrain: warning: {warning}", file=sys.stderr, flush=True)
                self.tracker.summary({"collapse_warning": warning, "collapse_step": self.step})
            if grid is not None:
                path = save_grid(self.out / "samples" / f"step_{self.step:08d}.png", *grid)
                self.tracker.log_image("val/reconstructions", path, step=self.step,
                                       caption="original | corrupted | restored")
        if improved:
            self._export(self.out, metrics)  # collective: every rank takes part in gathering the fp32 weights
        return metrics

    def _mean_train_image(self) -> torch.Tensor:
        """The mean of the first MEAN_IMAGE_SAMPLES training images (over the ranks), once per process: the
        flat answer a collapsed model gives, as a validation baseline."""
        import torch.distributed as dist

        from shards.stream import images_to_float, make_loader

        if self._mean_image is None:
            size = self.args.image_size
            acc = torch.zeros(1 + size * size, dtype=torch.float64, device=self.device)  # count, pixel sums
            loader = make_loader(self.train_urls, mode="eval", batch_size=self.micro, image_size=size,
                                 num_workers=min(self.args.num_workers, 1), rank=self.rank, world_size=self.world)
            for batch in loader:
                x = images_to_float(batch["image"], self.device).double().reshape(-1, size * size)
                acc[0] += x.shape[0]
                acc[1:] += x.sum(0)
                if acc[0] * self.world >= MEAN_IMAGE_SAMPLES:
                    break
            if self.world > 1:
                dist.all_reduce(acc)
            self._mean_image = (acc[1:] / acc[0].clamp(min=1)).float().reshape(1, 1, size, size)
        return self._mean_image

    # ------------------------------------------------------------------------------------- probes

    def _probe(self) -> None:
        """Rank 0 probes the frozen encoder (pretrain/probes.py) while the other ranks wait at a barrier.
        A resumed run without a reference probes the random init (rebuilt from --seed) first."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        if self.probe is not None:
            if self.probe.reference is None and self.step != 0:
                ref = self._probe_encoder(self._initial_model().encoder)
                self.probe.record(0, ref, 0.0, 0.0)
            metrics = self._probe_encoder(self.engine.module.encoder)
            seconds = time.perf_counter() - t0
            spent = time.perf_counter() - self._t_train - self._t_probes - seconds
            row = self.probe.record(self.step, metrics, seconds, spent)
            self.tracker.log(row, step=self.step)
            print(self.probe.summary_line(self.step, row), flush=True)
        if self.world > 1:
            dist.barrier()
        self._t_probes += time.perf_counter() - t0

    def _probe_encoder(self, encoder: torch.nn.Module) -> dict:
        autocast = self.precision.dtype if self.precision.how == "autocast" else None
        return self.probe.evaluate(encoder, device=self.device, input_dtype=self.precision.input_dtype,
                                   autocast_dtype=autocast)

    def _initial_model(self) -> torch.nn.Module:
        """The model as it was at step 0 (the same seeded init), without touching the global RNG."""
        from pretrain.model import build_unet

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed)
            model = build_unet(self.args.encoder, cbam_decoder=self.args.cbam_decoder,
                               cbam_encoder=self.args.cbam_encoder)
        dtype = self.precision.dtype if self.precision.how == "deepspeed" else torch.float32
        return model.to(self.device, dtype)

    def _export(self, where: Path, metrics: dict | None) -> None:
        """Export the fp32 master weights (gathered from the ZeRO partitions on every rank; rank 0 writes)."""
        from pretrain.model import build_unet, export_encoder
        from pretrain.precision import full_fp32_state_dict

        state = full_fp32_state_dict(self.engine)
        if self.rank != 0:
            return
        if getattr(self, "_export_model", None) is None:
            self._export_model = build_unet(self.args.encoder, cbam_decoder=self.args.cbam_decoder,
                                            cbam_encoder=self.args.cbam_encoder)
        keys = self._export_model.state_dict().keys()
        self._export_model.load_state_dict({k: state[k] for k in keys}, strict=True)
        meta = {"encoder": self.args.encoder, "image_size": self.args.image_size, "step": self.step,
                "samples_seen": self.samples_seen, "effective_batch": self.effective_batch, "lr": self.lr,
                "loss": self.args.loss, **self.precision.describe(), "world_size": self.world,
                "val": metrics or {}}
        export_encoder(self._export_model, where, meta)

    def _export_final(self) -> None:
        """With validation, RUN/encoder.pt is the best one and RUN/last/ the final; without, RUN/ is final."""
        where = self.out / "last" if self.val_urls else self.out
        self._export(where, None)
        if self.rank == 0:
            print(f"pretrain: done at step {self.step}; encoder in {self.out / 'encoder.pt'}"
                  + (f" (best val SSIM {self.best:.4f}), final in {where}" if self.val_urls and self.best else ""),
                  flush=True)

    def close(self) -> None:
        self.tracker.finish()


def scheduler_config(args) -> dict:
    """Linear warm-up from 0, then cosine decay to min_lr_ratio of the peak, over --max-steps optimizer steps."""
    return {"type": "WarmupCosineLR", "params": {
        "total_num_steps": args.max_steps, "warmup_num_steps": min(args.warmup_steps, args.max_steps),
        "warmup_type": "linear", "warmup_min_ratio": 0.0, "cos_min_ratio": args.min_lr_ratio}}


def _batch_seed(seed: int, rank: int, micro_batch: int) -> int:
    """The Genesis corruption seed of this rank's micro-batch number `micro_batch`: a function of the position
    alone, so a resumed run corrupts each batch exactly as the uninterrupted run does."""
    return ((seed * 1_000_003 + rank) * 2_147_483_659 + micro_batch) % 2 ** 63


def _all_reduce_stats(acc: torch.Tensor, first_bad: torch.Tensor, out_of_time: bool) -> dict:
    """One sum and one min over the ranks, at a sync step: the only host reads of the loop."""
    import torch.distributed as dist

    summed = torch.cat([acc, acc.new_tensor([float(out_of_time)])])
    low = first_bad.clone()
    if dist.get_world_size() > 1:
        dist.all_reduce(summed)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
    s = summed.tolist()
    fb = low.item()
    return {"loss_sum": s[0], "micro_steps": s[1], "bad": s[2], "out_of_time": s[3],
            "first_bad_step": int(fb) if math.isfinite(fb) else None}


def _f(t) -> float | str:
    v = float(t)
    return v if math.isfinite(v) else str(v)


def save_grid(path: Path, original, corrupted, restored) -> Path:
    """One row per sample: original | corrupted | restored, written atomically as PNG."""
    from torchvision.utils import make_grid

    from runkit.atomic import atomic_write_bytes

    rows = torch.stack([original, corrupted, restored], dim=1).flatten(0, 1).clamp(0, 1)
    img = make_grid(rows, nrow=3, padding=2, pad_value=1.0)[0]
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((img * 255).round().byte().numpy(), mode="L").save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
