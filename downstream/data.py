"""Downstream data: label selection, the shard index, in-memory sets and patient-grouped splits.

- Small sets (hundreds to a few thousand images) stream the shards once in eval mode into an in-memory
  `ImageSet`; every epoch, seed, split repeat and Tune trial reuses it.
- Large sets (NIH-14, diagnosis drawing on NIH) are first *indexed*: `scan_index` reads only the JSON of
  every sample (no PNG is decoded), which gives the targets, patient groups and splits. Splits, per-class
  balancing (`balance_per_class`) and the choice of what to load are made on the index, so an image that
  is not used is never decoded; `KeySelect` then streams exactly one split's keys (downstream.streaming).

Label selection lives here too, so "NIH No Finding -> normal" is decided in exactly one place.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runkit.errors import UserError
from shards.record import NIH_FINDINGS, SEVERITY_RANGES

DIAGNOSIS_CLASSES = ("covid", "pneumonia", "normal")
SEVERITY_TARGETS = tuple(SEVERITY_RANGES)  # geographic_mean (0-8), opacity_mean (0-6)


def diagnosis_target(rec: dict) -> int | None:
    """covid/pneumonia/normal index, or None to drop ("other", unknown, NIH images with other findings).

    NIH has no diagnosis field: "No Finding" is normal and any image labelled Pneumonia is pneumonia (seed 004).
    """
    labels = rec.get("labels") or {}
    dx = labels.get("diagnosis")
    if dx in DIAGNOSIS_CLASSES:
        return DIAGNOSIS_CLASSES.index(dx)
    findings = labels.get("findings")
    if dx is None and findings is not None:
        if len(findings) == 0:
            return DIAGNOSIS_CLASSES.index("normal")
        if "Pneumonia" in findings:
            return DIAGNOSIS_CLASSES.index("pneumonia")
    return None


def findings_target(rec: dict) -> np.ndarray | None:
    """14-dim multi-hot in shards.record.NIH_FINDINGS order; None where findings are unknown."""
    findings = (rec.get("labels") or {}).get("findings")
    if findings is None:
        return None
    return np.array([1.0 if f in findings else 0.0 for f in NIH_FINDINGS], dtype=np.float32)


def severity_target(rec: dict) -> np.ndarray | None:
    """[geographic_mean, opacity_mean] where both are known (joined from covid-severity-scores.csv)."""
    sev = (rec.get("labels") or {}).get("severity")
    if not sev:
        return None
    try:
        return np.array([float(sev[t]) for t in SEVERITY_TARGETS], dtype=np.float32)
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class ImageSet:
    """uint8 images [N,1,S,S] (4x smaller than float) + targets + the shard records they came from."""

    images: torch.Tensor
    targets: np.ndarray
    records: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def groups(self) -> np.ndarray:
        """Patient groups for splitting (see `patient_groups`); one per image without records."""
        if not self.records:
            return np.arange(len(self))
        return patient_groups(self.records)

    @property
    def splits(self) -> np.ndarray:
        return np.array([r.get("split", "") for r in self.records]) if self.records else np.array([""] * len(self))

    def subset(self, idx) -> ImageSet:
        idx = np.asarray(idx, dtype=int)
        return ImageSet(self.images[torch.as_tensor(idx)], self.targets[idx],
                        [self.records[i] for i in idx] if self.records else [])

    def float_images(self, idx=None) -> torch.Tensor:
        x = self.images if idx is None else self.images[torch.as_tensor(np.asarray(idx, dtype=int))]
        return x.float().div_(255.0)


def patient_groups(records: list[dict]) -> np.ndarray:
    """Patient groups for splitting; source-qualified so equal ids of two data sets stay apart."""
    return np.array([f"{r.get('source', '')}:{r.get('patient_id') or r.get('key')}" for r in records])


@dataclass
class ShardIndex:
    """Every usable sample of some shards, without pixels: key, target, patient group and split.

    Has the `targets`, `groups` and `splits` that `split_indices` and `balance_per_class` need."""

    urls: list[str]
    keys: np.ndarray
    targets: np.ndarray
    records: list[dict]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def groups(self) -> np.ndarray:
        return patient_groups(self.records)

    @property
    def splits(self) -> np.ndarray:
        return np.array([r.get("split", "") for r in self.records])

    def subset(self, idx) -> ShardIndex:
        idx = np.asarray(idx, dtype=int)
        return ShardIndex(self.urls, self.keys[idx], self.targets[idx], [self.records[i] for i in idx])


class KeySelect:
    """A picklable `select` for the shard stream: the task's label function, only for `keys`."""

    def __init__(self, select: Callable[[dict], object], keys):
        self.select = select
        self.keys = frozenset(str(k) for k in keys)

    def __call__(self, rec: dict):
        if rec.get("key") not in self.keys:
            return None
        return self.select(rec)


_LITE = ("key", "source", "patient_id", "split")


def scan_index(spec, select: Callable[[dict], object], *, desc: str = "indexing shards") -> ShardIndex:
    """Read the `<key>.json` members of every shard (PNG members are skipped, not decoded) and keep the
    samples `select` labels. A damaged shard or record is skipped, as the stream would skip it."""
    import json
    import tarfile

    from tqdm import tqdm

    urls = shard_urls(spec)
    keys, targets, records = [], [], []
    for url in tqdm(urls, desc=desc, unit="shard", leave=False):
        try:
            with tarfile.open(url, "r:*") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.endswith(".json"):
                        continue
                    try:
                        rec = json.loads(tar.extractfile(member).read())
                    except (ValueError, UnicodeDecodeError, OSError):
                        continue
                    target = select(rec)
                    if target is None:
                        continue
                    rec.setdefault("key", member.name[: -len(".json")].rsplit("/", 1)[-1])
                    keys.append(str(rec["key"]))
                    targets.append(np.asarray(target))
                    records.append({k: rec.get(k) for k in _LITE})
        except (tarfile.TarError, OSError, EOFError):
            continue
    if not keys:
        raise UserError(f"no usable samples in {len(urls)} shard file(s) for this task (check the labels)")
    return ShardIndex(urls, np.array(keys), np.stack(targets), records)


def balance_per_class(targets: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of `n` images of every class (seed 004: 607 each), drawn at random; a class with fewer
    than `n` images is a UserError naming it (so the table's class counts are what the paper says)."""
    y = np.asarray(targets)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < n:
            raise UserError(f"per_class {n}: class {int(c)} has only {len(idx)} images; lower per_class or add shards")
        out.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(out))


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


def shard_urls(spec) -> list[str]:
    from shards.stream import expand_urls

    parts = spec if isinstance(spec, (list, tuple)) else [spec]
    urls: list[str] = []
    for part in parts:
        for item in str(part).split():
            p = Path(item)
            if p.is_dir():
                found = sorted(str(t) for t in p.glob("*.tar"))
                if not found:
                    raise UserError(f"shard folder {p} holds no *.tar shards")
                urls.extend(found)
            else:
                urls.extend(expand_urls(item))
    if not urls:
        raise UserError(f"no shards in {spec!r}")
    return urls


def load_shards(spec, select: Callable[[dict], object], *, image_size: int, batch_size: int = 64,
                num_workers: int = 0, desc: str = "loading shards", keys=None, rank: int | None = None,
                world_size: int | None = None) -> ImageSet:
    """Stream shard folders / specs once (eval mode) and keep the samples `select` labels (only `keys`,
    if given: e.g. the images an index picked, so the rest are never decoded). `rank`/`world_size` as in
    `make_loader` (default: this process's share under torch.distributed; 0/1 reads everything)."""
    from tqdm import tqdm

    from shards.stream import images_to_float, make_loader

    urls = shard_urls(spec)
    if keys is not None:
        select = KeySelect(select, keys)
    loader = make_loader(urls, mode="eval", batch_size=batch_size, select=select, image_size=image_size,
                         num_workers=num_workers, rank=rank, world_size=world_size)
    images, targets, records = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        x = batch["image"]  # the shards' uint8 as they are (16-bit shards are rounded to 8 bits here)
        images.append(x if x.dtype == torch.uint8 else images_to_uint8(images_to_float(x)))
        t = batch["target"]
        targets.append(t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
        records.extend(batch["record"])
    if not images:
        raise UserError(f"no usable samples in {len(urls)} shard file(s) for this task (check the labels)")
    return ImageSet(torch.cat(images), np.concatenate(targets), records)


def split_indices(data, *, seed: int = 0, resplit: bool = False,
                  fractions=(0.64, 0.16, 0.20)) -> dict[str, np.ndarray]:
    """train/val/test indices: the records' own patient-grouped splits, or (resplit, or a split is empty)
    a class-stratified, patient-grouped random split with the same 64/16/20 proportions.

    `data` is an `ImageSet` or a `ShardIndex` (anything with targets, groups and splits)."""
    splits = data.splits
    if not resplit and all((splits == s).any() for s in ("train", "val", "test")):
        return {s: np.flatnonzero(splits == s) for s in ("train", "val", "test")}
    from sklearn.model_selection import StratifiedGroupKFold

    y = data.targets if data.targets.ndim == 1 else np.zeros(len(data), dtype=int)
    groups = data.groups
    n_test = max(2, round(1 / fractions[2]))
    outer = StratifiedGroupKFold(n_splits=n_test, shuffle=True, random_state=seed)
    rest, test = next(outer.split(np.zeros(len(y)), y, groups))
    n_val = max(2, round((1 - fractions[2]) / fractions[1]))
    inner = StratifiedGroupKFold(n_splits=n_val, shuffle=True, random_state=seed + 1)
    tr, va = next(inner.split(np.zeros(len(rest)), y[rest], groups[rest]))
    return {"train": np.sort(rest[tr]), "val": np.sort(rest[va]), "test": np.sort(test)}
