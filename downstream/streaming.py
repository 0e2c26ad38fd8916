"""Large downstream sets train from streamed shards: one split of a `ShardIndex`, read through
`shards.stream.make_loader` with a `KeySelect`, so only that split's images are decoded and at most one
batch plus the shuffle buffer is in memory (benchmarks/bench_nih14_stream.py measures it).

Training uses the stream's train mode (resampled shards, shuffled, a fixed number of full batches per
epoch); evaluation its eval mode (every sample once). Predictions come back in index order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from downstream.data import KeySelect, ShardIndex


@dataclass
class StreamedSet:
    """A split to stream: its index rows, the task's label function and the loader settings."""

    index: ShardIndex
    select: Callable[[dict], object]
    image_size: int
    num_workers: int = 0
    shuffle_buffer: int = 1000
    _train: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (settings, loader)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_train": None}  # a live loader (its worker processes) does not travel

    @property
    def targets(self) -> np.ndarray:
        return self.index.targets

    @property
    def records(self) -> list[dict]:
        return self.index.records

    def _loader(self, mode: str, batch_size: int, epoch_size: int | None = None, seed: int = 0):
        from shards.stream import make_loader

        return make_loader(self.index.urls, mode=mode, batch_size=batch_size,
                           select=KeySelect(self.select, self.index.keys), image_size=self.image_size,
                           epoch_size=epoch_size, num_workers=self.num_workers,
                           shuffle_buffer=self.shuffle_buffer, seed=seed, rank=0, world_size=1)

    def train_batches(self, batch_size: int, steps: int, seed: int, epoch: int = 0
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`steps` shuffled full batches (images uint8 [B,1,S,S]: `to_float` on the device; targets) of this split.

        One loader per (batch_size, steps, seed), kept between calls, so its workers persist across epochs;
        `epoch` picks that epoch's shard and sample order."""
        settings = (batch_size, steps, seed)
        if self._train is None or self._train[0] != settings:
            self._train = (settings, self._loader("train", batch_size, epoch_size=steps * batch_size, seed=seed))
        loader = self._train[1]
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch["image"], _tensor(batch["target"])

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray, list[str]]]:
        """Every image of the split once: (uint8 images, targets, keys)."""
        for batch in self._loader("eval", batch_size):
            yield batch["image"], _tensor(batch["target"]).numpy(), list(batch["key"])

    def order(self, keys: list[str]) -> np.ndarray:
        """Positions in this split's index of stream-order `keys` (to put predictions in index order)."""
        where = {k: i for i, k in enumerate(self.index.keys.tolist())}
        return np.array([where[k] for k in keys], dtype=int)


def _tensor(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t))


def prepare_sets(cfg: dict, select: Callable[[dict], object], image_size: int, desc: str):
    """The data of a fine-tuning job and its patient-grouped splits: (data, splits).

    `stream: off` without `per_class` loads every labelled image into an `ImageSet` (the small-set path).
    Otherwise the shards are indexed first (JSON only); `per_class` balances classes on the index (and then
    the split is always the stratified patient-grouped 64/16/20 one); the index is streamed when
    `stream: on`, or `auto` and it holds more than `stream_above` images, else only its images load.
    `data` is then an `ImageSet` or a `ShardIndex`; `split_sets` turns either into train/val/test sets.
    """
    from downstream.data import balance_per_class, load_shards, scan_index, split_indices
    from runkit.errors import UserError

    if not cfg.get("shards"):
        raise UserError("this job needs --shards")
    resplit = bool(cfg["resplit"])
    if cfg["stream"] == "off" and not cfg.get("per_class"):
        data = load_shards(cfg["shards"], select, image_size=image_size, desc=desc)
    else:
        data = scan_index(cfg["shards"], select, desc=desc.replace("shards", "index"))
        if cfg.get("per_class"):
            if data.targets.ndim != 1:
                raise UserError("per_class needs single-label targets (diagnosis)")
            data = data.subset(balance_per_class(data.targets, int(cfg["per_class"]), int(cfg["split_seed"])))
            resplit = True
        stream = cfg["stream"] == "on" or (cfg["stream"] == "auto" and len(data) > int(cfg["stream_above"]))
        if not stream:
            data = load_shards(data.urls, select, image_size=image_size, desc=desc, keys=data.keys)
    return data, split_indices(data, seed=int(cfg["split_seed"]), resplit=resplit)


def split_sets(data, splits: dict, select: Callable[[dict], object], image_size: int, cfg: dict) -> tuple:
    """(train, val, test): ImageSet subsets, or StreamedSets of a ShardIndex."""
    from downstream.data import ShardIndex

    if isinstance(data, ShardIndex):
        return tuple(StreamedSet(data.subset(splits[s]), select, image_size, num_workers=int(cfg["num_workers"]),
                                 shuffle_buffer=int(cfg["shuffle_buffer"])) for s in ("train", "val", "test"))
    return tuple(data.subset(splits[s]) for s in ("train", "val", "test"))
