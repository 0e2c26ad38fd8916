"""The classifier training loop shared by diagnosis (softmax) and the NIH-14 head (multi-label BCE).

Modes:
- `full`: every backbone parameter trains, at `backbone_lr` (default lr / 10);
- `partial`: the deepest `unfreeze` stages train, stage i below the top at lr * lr_decay**(i+1)
  (discriminative learning rates); shallower stages are frozen and their BatchNorm stays in eval mode;
- `linear`: a linear probe; the frozen backbone's pooled features are computed once and only the head trains.

Data: an in-memory `ImageSet` (uint8 images, moved to the device a batch at a time and converted there)
or a `downstream.streaming.StreamedSet` (a split streamed from the shards, for sets too large to hold).
Device: `device` (a torch.device the job decided); on CUDA the forward passes run under bf16 autocast.

`report(metrics)` is called after every epoch with the validation metrics (Ray Tune reports there and
ASHA may stop the trial); the weights of the best epoch on `monitor` are restored at the end.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from downstream.augment import augment
from downstream.backbones import Backbone
from downstream.config import FinetuneConfig
from downstream.data import ImageSet
from downstream.device import autocast, to_float
from downstream.streaming import StreamedSet

MODES = ("full", "partial", "linear")
BALANCE = ("sampler", "weights", "none")


def resolve(config, cls: type[FinetuneConfig] = FinetuneConfig, source: str = "config") -> dict:
    """A config mapping (or dataclass) validated as `cls` -> plain dict; unknown keys are UserErrors."""
    if isinstance(config, FinetuneConfig):
        config = config.to_dict()
    return cls.from_dict(config, source).to_dict()


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


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _image_batches(source, batch_size: int, device: torch.device, progress: bool = False, desc: str = "predict"
                   ) -> Iterator[tuple[torch.Tensor, np.ndarray | None, np.ndarray | None]]:
    """(float images on `device`, targets, index positions) over an ImageSet / StreamedSet / tensor."""
    from tqdm import tqdm

    if isinstance(source, StreamedSet):
        for x, y, keys in tqdm(source.eval_batches(batch_size), desc=desc, leave=False, disable=not progress):
            yield to_float(x, device), y, source.order(keys)
        return
    images = source.images if isinstance(source, ImageSet) else source
    for s in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress):
        idx = np.arange(s, min(s + batch_size, len(images)))
        yield to_float(images[s:s + batch_size], device), None, idx


@torch.no_grad()
def recalibrate_bn(model: Classifier, images, batches: int, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics as exact averages over (un-augmented) training images.

    After a few hundred steps on a small data set the momentum-0.1 running averages still lag the weights,
    and an eval-mode model can collapse to one class even though training loss is low ("precise BN").
    `images` is a uint8/float tensor (already in a random order) or a StreamedSet.
    """
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and any(p.requires_grad for p in m.parameters())]
    if not bns or batches <= 0:
        return
    device = _device_of(model)
    saved = [(m, m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    for i, (x, _, _) in enumerate(_image_batches(images, batch_size, device)):
        if i >= batches:
            break
        if len(x) < 2:  # a last batch of one image: train-mode BatchNorm cannot use it (1x1 maps)
            continue
        with autocast(device):
            model.backbone(x)
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
def predict_with_targets(model: Classifier, source, batch_size: int = 64, progress: bool = False
                         ) -> tuple[torch.Tensor, np.ndarray | None]:
    """Logits (float32, CPU) in the source's order, and the targets (streamed sets: from the stream)."""
    model.eval()
    device = _device_of(model)
    n = len(source)
    logits, targets = None, None
    for x, y, idx in _image_batches(source, batch_size, device, progress):
        with autocast(device):
            out = model(x).float().cpu()
        if logits is None:
            logits = torch.zeros(n, out.shape[1])
            if y is not None:
                targets = np.zeros((n, *y.shape[1:]), dtype=y.dtype)
        logits[torch.as_tensor(idx)] = out
        if y is not None:
            targets[idx] = y
    if logits is None:
        return torch.zeros(0), targets
    return logits, targets


def predict(model: Classifier, images, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Logits for uint8 or float images (or an ImageSet / StreamedSet), in eval mode, on the model's device."""
    return predict_with_targets(model, images, batch_size, progress)[0]


@torch.no_grad()
def pooled_features(backbone: Backbone, images, batch_size: int = 64, progress: bool = False,
                    flip: str = "none", device: torch.device | None = None) -> torch.Tensor:
    """Frozen pooled features (float32, CPU) of uint8/float images or a set, extracted on `device` (default:
    the backbone's); `flip` in none|h|v|hv (for feature augmentation)."""
    backbone.eval()
    device = device or _device_of(backbone)
    backbone.to(device)
    out = None
    for x, _, idx in _image_batches(images, batch_size, device, progress, desc=f"features[{flip}]"):
        if "h" in flip:
            x = x.flip(3)
        if "v" in flip:
            x = x.flip(2)
        with autocast(device):
            f = backbone.pooled(x).float().cpu()
        if out is None:
            out = torch.zeros(len(images), f.shape[1])
        out[torch.as_tensor(idx)] = f
    return out if out is not None else torch.zeros(0)


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


def class_weights(y: np.ndarray, multiclass: bool) -> torch.Tensor:
    """Multi-class: n / (K * count) per class; multi-label: the positive weight negatives / positives."""
    if multiclass:
        counts = np.bincount(y, minlength=int(y.max()) + 1).astype(float)
        return torch.as_tensor(len(y) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float)
    pos = np.asarray(y, dtype=float).sum(0)
    return torch.as_tensor((len(y) - pos) / np.maximum(pos, 1.0), dtype=torch.float)


def fit(model: Classifier, train, val, config: dict, *, multiclass: bool,
        evaluate: Callable[[np.ndarray, np.ndarray], dict], monitor: str,
        report: Callable[[dict], object] | None = None, log: Callable[[dict, int], None] | None = None,
        device: torch.device | str = "cpu") -> dict:
    """Train `model` in place on `device`; returns {'history', 'best_epoch', 'best': val metrics of the
    restored epoch, 'balance': what balancing ran}.

    `train`/`val` are ImageSets or StreamedSets. `evaluate(probabilities, targets)` gives the validation
    metrics; `monitor` (higher is better) picks the epoch. A streamed training split cannot be drawn from
    by class, so `balance: sampler` becomes the class-weighted loss there (recorded in the result).
    """
    from tqdm import tqdm

    cfg = config
    device = torch.device(device)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    torch.manual_seed(int(cfg["seed"]))
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    model.to(device)
    groups, frozen = configure_trainable(model, cfg)
    opt = torch.optim.AdamW(groups, weight_decay=float(cfg["weight_decay"]))
    epochs = int(cfg["epochs"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    linear = cfg["mode"] == "linear"
    streamed = isinstance(train, StreamedSet)
    balance = cfg["balance"]
    if streamed and balance == "sampler":
        balance = "weights"
    y_train = train.targets
    weight = class_weights(y_train, multiclass).to(device) if balance == "weights" else None
    if multiclass:
        def loss_fn(logits, y):
            return F.cross_entropy(logits.float(), y.long(), weight=weight)
    else:
        def loss_fn(logits, y):
            return F.binary_cross_entropy_with_logits(logits.float(), y.float(), pos_weight=weight)

    bs, evbs = int(cfg["batch_size"]), int(cfg["eval_batch_size"])
    # A linear probe sees each image's frozen features, computed once (no augmentation needed).
    feats_train = pooled_features(model.backbone, train, evbs, device=device).to(device) if linear else None
    feats_val = pooled_features(model.backbone, val, evbs, device=device).to(device) if linear else None
    y_all = torch.as_tensor(y_train).to(device)

    def val_probs() -> tuple[np.ndarray, np.ndarray]:
        if linear:
            model.head.eval()
            with torch.no_grad():
                logits = model.head(feats_val).float().cpu()
            targets = val.targets
        else:
            logits, targets = predict_with_targets(model, val, evbs)
            targets = val.targets if targets is None else targets
        return (logits.softmax(1) if multiclass else logits.sigmoid()).numpy(), targets

    aug = {k: cfg[k] for k in ("hflip", "vflip", "affine", "brightness_contrast")}
    steps = int(cfg["steps_per_epoch"] or max(1, int(np.ceil(len(train) / bs))))
    history, best_state, best_score, best_epoch, best = [], None, -np.inf, -1, {}
    for epoch in range(epochs):
        t0 = time.time()
        _train_mode(model, frozen, linear)
        losses = []
        if streamed and not linear:
            batches = train.train_batches(bs, steps, seed=int(cfg["seed"]) * 1000, epoch=epoch)
        else:
            batches = _batches(len(train), y_train, {**cfg, "balance": balance}, gen, multiclass)
        for item in tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                         disable=not cfg["progress"]):
            if linear:
                idx = item.to(device)
                logits, y = model.head(feats_train[idx]), y_all[idx]
            else:
                if streamed:
                    x, y = to_float(item[0], device), item[1].to(device)
                else:
                    x, y = to_float(train.images[item], device), y_all[item.to(device)]
                x = augment(x, gen=gen, **aug)
                with autocast(device):
                    logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        if not linear and cfg["bn_recalibrate"]:
            source = train if streamed else train.images[torch.randperm(len(train), generator=gen)]
            recalibrate_bn(model, source, int(cfg["bn_recalibrate"]), evbs)
        probs, targets = val_probs()
        metrics = evaluate(probs, targets)
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
    return {"history": history, "best_epoch": best_epoch, "best": best, "balance": balance}
