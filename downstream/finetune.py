"""The classifier training loop shared by diagnosis (softmax) and the NIH-14 head (multi-label BCE).

Modes:
- `full`: every backbone parameter trains, at `backbone_lr` (default lr / 10);
- `partial`: the deepest `unfreeze` stages train, stage i below the top at lr * lr_decay**(i+1)
  (discriminative learning rates); shallower stages are frozen and their BatchNorm stays in eval mode;
- `linear`: a linear probe; the frozen backbone's pooled features are computed once and only the head trains.

`report(metrics)` is called after every epoch with the validation metrics (Ray Tune reports there and
ASHA may stop the trial); the weights of the best epoch on `monitor` are restored at the end.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from downstream.augment import augment
from downstream.backbones import Backbone
from downstream.data import ImageSet
from runkit.errors import UserError

MODES = ("full", "partial", "linear")
BALANCE = ("sampler", "weights", "none")

FINETUNE_DEFAULTS = {
    "mode": "full", "head": "linear", "hidden": 256, "dropout": 0.2,
    "lr": 1e-3, "backbone_lr": None, "unfreeze": 2, "lr_decay": 0.3, "weight_decay": 1e-4,
    "epochs": 10, "batch_size": 32, "eval_batch_size": 64, "steps_per_epoch": None, "balance": "sampler",
    "hflip": True, "vflip": False, "affine": True, "brightness_contrast": True,
    "seed": 0, "num_threads": None, "progress": True, "bn_recalibrate": 16,
}


def resolve(config: dict | None, defaults: dict) -> dict:
    cfg = {**defaults, **{k: v for k, v in (config or {}).items() if v is not None or k not in defaults}}
    if cfg["mode"] not in MODES:
        raise UserError(f"mode {cfg['mode']!r} is not one of {MODES}")
    if cfg["balance"] not in BALANCE:
        raise UserError(f"balance {cfg['balance']!r} is not one of {BALANCE}")
    if cfg["head"] not in ("linear", "mlp"):
        raise UserError(f"head {cfg['head']!r} is not linear or mlp")
    if int(cfg["epochs"]) < 1 or int(cfg["batch_size"]) < 1:
        raise UserError("epochs and batch_size must be at least 1")
    return cfg


class Classifier(nn.Module):
    """backbone -> global average pooling -> dropout -> linear (or a one-hidden-layer MLP)."""

    def __init__(self, backbone: Backbone, num_outputs: int, head: str = "linear", dropout: float = 0.2,
                 hidden: int = 256):
        super().__init__()
        self.backbone = backbone
        c = backbone.num_features
        if head == "mlp":
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c, hidden), nn.ReLU(inplace=True),
                                      nn.Dropout(dropout), nn.Linear(hidden, num_outputs))
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.pooled(x))


def configure_trainable(model: Classifier, cfg: dict) -> tuple[list[dict], list[nn.Module]]:
    """Freeze per mode; return optimiser param groups and the frozen stage modules (kept in eval mode)."""
    lr = float(cfg["lr"])
    stages = model.backbone.stage_modules()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]
    frozen = list(stages)
    if cfg["mode"] == "full":
        blr = float(cfg["backbone_lr"]) if cfg["backbone_lr"] is not None else lr / 10
        for p in model.backbone.parameters():
            p.requires_grad_(True)
        groups.append({"params": [p for p in model.backbone.parameters()], "lr": blr, "name": "backbone"})
        frozen = []
    elif cfg["mode"] == "partial":
        k = max(0, min(int(cfg["unfreeze"]), len(stages)))
        for i, stage in enumerate(reversed(stages[len(stages) - k:])):
            for p in stage.parameters():
                p.requires_grad_(True)
            groups.append({"params": list(stage.parameters()), "lr": lr * float(cfg["lr_decay"]) ** (i + 1),
                           "name": f"stage-{i}"})
        frozen = stages[:len(stages) - k]
    return groups, frozen


@torch.no_grad()
def recalibrate_bn(model: Classifier, images: torch.Tensor, batches: int, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics as exact averages over (un-augmented) training images.

    After a few hundred steps on a small data set the momentum-0.1 running averages still lag the weights,
    and an eval-mode model can collapse to one class even though training loss is low ("precise BN").
    """
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and any(p.requires_grad for p in m.parameters())]
    if not bns or batches <= 0:
        return
    saved = [(m, m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    n = min(len(images), batches * batch_size)
    for s in range(0, n, batch_size):
        x = images[s:s + batch_size]
        model.backbone(x.float().div(255.0) if x.dtype == torch.uint8 else x)
    for m, momentum, training in saved:
        m.momentum = momentum
        m.train(training)


def _train_mode(model: Classifier, frozen: list[nn.Module], linear: bool) -> None:
    model.train()
    if linear:
        model.backbone.eval()
    for m in frozen:
        m.eval()


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Logits for uint8 or float images, in eval mode."""
    from tqdm import tqdm

    model.eval()
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc="predict", leave=False, disable=not progress):
        x = images[s:s + batch_size]
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x
        out.append(model(x))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def pooled_features(backbone: Backbone, images: torch.Tensor, batch_size: int = 64, progress: bool = False,
                    flip: str = "none") -> torch.Tensor:
    """Frozen pooled features of uint8/float images; `flip` in none|h|v|hv (for feature augmentation)."""
    from tqdm import tqdm

    backbone.eval()
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc=f"features[{flip}]", leave=False, disable=not progress):
        x = images[s:s + batch_size]
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x
        if "h" in flip:
            x = x.flip(3)
        if "v" in flip:
            x = x.flip(2)
        out.append(backbone.pooled(x))
    return torch.cat(out)


def _batches(n: int, targets: np.ndarray, cfg: dict, gen: torch.Generator, multiclass: bool):
    bs = int(cfg["batch_size"])
    steps = int(cfg["steps_per_epoch"] or max(1, int(np.ceil(n / bs))))
    if multiclass and cfg["balance"] == "sampler":
        counts = np.bincount(targets, minlength=int(targets.max()) + 1).astype(float)
        w = torch.as_tensor(1.0 / np.maximum(counts, 1.0)[targets], dtype=torch.float)
        idx = torch.multinomial(w, steps * bs, replacement=True, generator=gen)
    else:
        reps = int(np.ceil(steps * bs / n))
        idx = torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:steps * bs]
    return [idx[i * bs:(i + 1) * bs] for i in range(steps)]


def fit(model: Classifier, train: ImageSet, val: ImageSet, config: dict, *, multiclass: bool,
        evaluate: Callable[[np.ndarray, np.ndarray], dict], monitor: str,
        report: Callable[[dict], object] | None = None, log: Callable[[dict, int], None] | None = None) -> dict:
    """Train `model` in place; returns {'history', 'best_epoch', 'best': val metrics of the restored epoch}.

    `evaluate(probabilities, targets)` gives the validation metrics; `monitor` (higher is better) picks the epoch.
    """
    from tqdm import tqdm

    cfg = config
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    torch.manual_seed(int(cfg["seed"]))
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    groups, frozen = configure_trainable(model, cfg)
    opt = torch.optim.AdamW(groups, weight_decay=float(cfg["weight_decay"]))
    epochs = int(cfg["epochs"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    linear = cfg["mode"] == "linear"
    y_train = train.targets
    if multiclass:
        y_all = torch.as_tensor(y_train, dtype=torch.long)
        weight = None
        if cfg["balance"] == "weights":
            counts = np.bincount(y_train, minlength=int(y_train.max()) + 1).astype(float)
            weight = torch.as_tensor(len(y_train) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float)

        def loss_fn(logits, y):
            return F.cross_entropy(logits, y, weight=weight)
    else:
        y_all = torch.as_tensor(y_train, dtype=torch.float)

        def loss_fn(logits, y):
            return F.binary_cross_entropy_with_logits(logits, y)

    # A linear probe sees each image's frozen features, computed once (no augmentation needed).
    feats_train = pooled_features(model.backbone, train.images, int(cfg["eval_batch_size"])) if linear else None
    feats_val = pooled_features(model.backbone, val.images, int(cfg["eval_batch_size"])) if linear else None

    def val_probs() -> np.ndarray:
        if linear:
            model.head.eval()
            with torch.no_grad():
                logits = model.head(feats_val)
        else:
            logits = predict(model, val.images, int(cfg["eval_batch_size"]))
        return (logits.softmax(1) if multiclass else logits.sigmoid()).numpy()

    aug = {k: cfg[k] for k in ("hflip", "vflip", "affine", "brightness_contrast")}
    history, best_state, best_score, best_epoch, best = [], None, -np.inf, -1, {}
    for epoch in range(epochs):
        t0 = time.time()
        _train_mode(model, frozen, linear)
        losses = []
        batches = _batches(len(train), y_train, cfg, gen, multiclass)
        for idx in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not cfg["progress"]):
            y = y_all[idx]
            if linear:
                logits = model.head(feats_train[idx])
            else:
                x = augment(train.images[idx].float().div_(255.0), gen=gen, **aug)
                logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        if not linear and cfg["bn_recalibrate"]:
            order = torch.randperm(len(train), generator=gen)
            recalibrate_bn(model, train.images[order], int(cfg["bn_recalibrate"]), int(cfg["eval_batch_size"]))
        metrics = evaluate(val_probs(), val.targets)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "seconds": time.time() - t0,
               **{f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}}
        history.append(row)
        score = metrics.get(monitor, float("nan"))
        score = -np.inf if np.isnan(score) else score
        if best_state is None or score > best_score:
            best_score, best_epoch, best = score, epoch + 1, metrics
            best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
        if log is not None:
            log(row, epoch + 1)
        if report is not None:
            report(row)
    model.load_state_dict(best_state)
    model.eval()
    return {"history": history, "best_epoch": best_epoch, "best": best}
