"""The one reader of shard folders: pretrain and downstream both stream batches through `make_loader`.

Built on webdataset 1.0.2's pieces (ResampledShards, url_opener, tar_file_expander, group_by_keys,
shuffle) with the splitting done explicitly, because the defaults are wrong for us:
- mode="train": each rank and each DataLoader worker resamples shards with its own seed (seed, rank,
  worker, epoch), shuffles samples in a buffer, and yields full batches only; the loader stops after
  exactly `epoch_size // (world_size * batch_size)` batches on every rank, so DeepSpeed never waits
  on a rank that ran out of data.
- mode="eval": shards are split by rank, then by worker (the explicit form of wds.split_by_node and
  wds.split_by_worker); with fewer shards than ranks x workers every reader walks all shards and keeps
  every (ranks x workers)-th sample instead, so no worker is empty. Every sample is seen exactly once
  across ranks and workers; the last batch of a rank may be partial.
- A corrupt or truncated shard, or a sample that does not decode, is skipped and counted in
  `loader.stats` (a StreamStats), never via wds.warn_and_continue, which sleeps 0.5 s per error.
- Mixtures (train mode): `urls` may be weighted groups, `nih=0.5:'A/*.tar' chexpert=0.3:'B/*.tar'`
  (see `parse_mixture`). Each worker resamples every group's shards on its own and draws the group of
  each next sample with the weights, so the sample mix follows the weights whatever the shard sizes;
  batches are full and their count per rank fixed exactly as above. `loader.realised_mix()` /
  `mix_metrics()` report what was drawn. In eval mode a mixture is the union of its groups.
- Encodings: PNG shards (`<key>.png`) are decoded by `decode_png`; raw shards (`build --encoding raw`,
  `<key>.npy`) are only viewed (`decode_npy`, no copy): several times more images/s per core.
- Batches carry the stored integers, uint8 (uint16 for `build --bit-depth 16`), stacked once into the
  batch tensor (in shared memory when a worker makes it); `images_to_float` converts them on the device
  (/255, /65535). Workers persist across epochs; pixels are pinned when CUDA is available.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
import re
import shlex
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from runkit.errors import UserError
from runkit.redact import redact

log = logging.getLogger(__name__)
MODES = ("train", "eval")
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")
_GLOB_CHARS = set("*?[")
_MAX_LOGGED = 5
_MAX_PIXELS = 100_000_000


def expand_urls(spec: str | Iterable[str]) -> list[str]:
    """A shell-style list (or a list) of paths, globs, brace patterns and pipe: URLs -> shard URLs.

    Local paths are checked now: a missing file or an empty glob raises UserError at start-up instead
    of a worker failing (or hanging) later. Remote URLs cannot be checked and pass through. A string
    that starts with `pipe:` is one URL (its command has spaces); quote pipe: URLs inside a longer list.
    """
    groups = getattr(spec, "groups", None)
    if groups is None and not isinstance(spec, MixtureUrls):
        groups = parse_mixture(spec)
    if groups is not None:
        return MixtureUrls([u for g in groups for u in g.urls], groups)
    if isinstance(spec, str):
        tokens = [spec.strip()] if spec.strip().startswith("pipe:") else shlex.split(spec)
    else:
        tokens = [str(s) for s in spec]
    urls: list[str] = []
    for token in tokens:
        for url in braceexpand(token):
            if url.startswith(_REMOTE_PREFIXES):
                urls.append(url)
                continue
            path = url.removeprefix("file:")
            path = os.path.expanduser(path)
            if _GLOB_CHARS & set(path):
                found = sorted(glob.glob(path))
                if not found:
                    raise UserError(f"shard pattern {url!r} matches no files")
                urls.extend(found)
            elif os.path.isdir(path):
                raise UserError(f"{url!r} is a folder; give shard files, e.g. {os.path.join(url, 'train-*.tar')}")
            elif not os.path.isfile(path):
                raise UserError(f"shard file {url!r} does not exist")
            else:
                urls.append(path)
    if not urls:
        raise UserError(f"no shards given ({spec!r})")
    return urls


class MixtureUrls(list):
    """The shards of a mixture, all groups together, with the groups themselves in `.groups`."""

    def __init__(self, urls: Iterable[str], groups: list[MixGroup]):
        super().__init__(urls)
        self.groups = groups

    def __reduce__(self):
        return MixtureUrls, (list(self), self.groups)


_GROUP_RE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)=(?P<weight>[^:]*):(?P<spec>.*)$", re.DOTALL)


@dataclass(frozen=True)
class MixGroup:
    """One weighted group of a mixture: a name, a weight (normalised to sum 1 over groups), its shards."""
    name: str
    weight: float
    urls: tuple[str, ...]


def _tokens(spec: str | Iterable[str]) -> list[str]:
    if isinstance(spec, MixtureUrls):
        return []
    if isinstance(spec, str):
        return [spec.strip()] if spec.strip().startswith("pipe:") else shlex.split(spec)
    return [str(s) for s in spec]


def is_mixture(spec: str | Iterable[str]) -> bool:
    """Whether a shard spec uses the weighted-group syntax (any token of the form NAME=WEIGHT:...)."""
    if isinstance(spec, MixtureUrls):
        return True
    try:
        return any(_GROUP_RE.match(t) for t in _tokens(spec))
    except ValueError:
        return False


def parse_mixture(spec: str | Iterable[str]) -> list[MixGroup] | None:
    """`NAME=WEIGHT:PATTERNS ...` -> groups; None when `spec` is a plain list of shards.

    Each token is one group: a name (letters, digits, `_`, `-`), `=`, a positive weight, `:`, then
    the group's shards as any plain shard spec (quote it so the shell leaves globs alone, and use
    spaces inside the quotes for several patterns: `nih=2:'A/train-*.tar A/test-*.tar'`). Weights are
    relative (normalised to sum 1). Every token must be a group once one is; names are unique;
    patterns are checked at once like plain specs (an empty glob is a UserError).
    """
    if isinstance(spec, MixtureUrls):
        return spec.groups
    tokens = _tokens(spec)
    matches = [_GROUP_RE.match(t) for t in tokens]
    if not any(matches):
        return None
    bad = [t for t, m in zip(tokens, matches) if not m]
    if bad:
        raise UserError(f"mixture token {bad[0]!r} is not NAME=WEIGHT:PATTERN (every token of a mixture must be a group)")
    groups, raw = [], []
    for m in matches:
        name, text, inner = m["name"], m["weight"].strip(), m["spec"].strip()
        try:
            weight = float(text)
        except ValueError:
            raise UserError(f"mixture group {name!r}: weight {text!r} is not a number") from None
        if not (weight > 0 and weight != float("inf")):
            raise UserError(f"mixture group {name!r}: weight {text!r} must be a positive number")
        if any(g[0] == name for g in raw):
            raise UserError(f"mixture group {name!r} is given twice")
        if not inner:
            raise UserError(f"mixture group {name!r} names no shards")
        raw.append((name, weight, tuple(expand_urls(inner))))
    total = sum(w for _, w, _ in raw)
    for name, weight, urls in raw:
        groups.append(MixGroup(name, weight / total, urls))
    return groups


@dataclass
class StreamStats:
    """What the reader skipped. Counts are merged from the workers as their batches arrive."""
    samples: int = 0            # samples yielded in batches
    batches: int = 0
    shard_errors: int = 0       # tar/stream errors (a truncated shard may add more than one)
    sample_errors: int = 0      # samples that did not decode (bad PNG/JSON, incomplete sample)
    dropped: int = 0            # samples that `select` dropped (returned None)
    bad_shards: set[str] = field(default_factory=set)
    reasons: Counter = field(default_factory=Counter)
    mix: Counter = field(default_factory=Counter)  # samples yielded per mixture group

    @property
    def skipped(self) -> int:
        return self.shard_errors + self.sample_errors

    def merge(self, delta: dict) -> None:
        self.shard_errors += delta["shard_errors"]
        self.sample_errors += delta["sample_errors"]
        self.dropped += delta["dropped"]
        self.bad_shards.update(delta["bad_shards"])
        self.reasons.update(delta["reasons"])

    def as_dict(self) -> dict:
        return {"samples": self.samples, "batches": self.batches, "shard_errors": self.shard_errors,
                "sample_errors": self.sample_errors, "dropped": self.dropped,
                "bad_shards": sorted(self.bad_shards), "reasons": dict(self.reasons), "mix": dict(self.mix)}


class _WorkerStats:
    """Per-worker counters; `delta()` hands what accrued since the last batch to the main process."""

    def __init__(self):
        self.logged = 0
        self.since_sample = 0  # shards opened since the last good sample (train-mode stall guard)
        self._reset()

    def _reset(self):
        self.d = {"shard_errors": 0, "sample_errors": 0, "dropped": 0, "bad_shards": [], "reasons": Counter()}

    def delta(self) -> dict:
        d = self.d
        self._reset()
        return d

    def _note(self, kind: str, url: str | None, exn: BaseException | str) -> None:
        text = exn if isinstance(exn, str) else f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}"
        text = redact(str(text))  # a pipe: command's error names its command, credentials and all
        self.d["reasons"][f"{kind}: {text.split(' @ ')[0][:120]}"] += 1
        if self.logged < _MAX_LOGGED:
            self.logged += 1
            log.warning("skipped %s in %s: %s", kind, redact(url) if url else url, text)

    def shard_error(self, exn: BaseException) -> bool:
        """webdataset handler: count, remember the shard, and carry on (no sleep)."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and a != exn.args[0]), None)
        self.d["shard_errors"] += 1
        if url:
            self.d["bad_shards"].append(redact(url))
        self._note("shard", url, exn)
        return True

    def sample_error(self, url: str | None, reason: str) -> None:
        self.d["sample_errors"] += 1
        self._note("sample", url, reason)


def _seed(*parts: int) -> int:
    return random.Random(repr(parts)).getrandbits(63)


def _stride(samples: Iterator[dict], index: int, every: int) -> Iterator[dict]:
    for i, sample in enumerate(samples):
        if i % every == index:
            yield sample


def _count_shards(urls: Iterator[dict], stats: _WorkerStats, limit: int) -> Iterator[dict]:
    for u in urls:
        stats.since_sample += 1
        if stats.since_sample > limit:
            raise UserError(f"no usable sample in {limit} consecutive shards: are they all corrupt, "
                            f"or does `select` drop every sample?")
        yield u


def _decode(samples: Iterator[dict], stats: _WorkerStats, select, image_size) -> Iterator[tuple]:
    """Parse the JSON, apply `select` before touching the pixels, decode (PNG) or view (raw .npy) them, resize."""
    for sample in samples:
        url = sample.get("__url__")
        ext = "npy" if "npy" in sample else "png"
        if "json" not in sample or ext not in sample:
            stats.sample_error(url, f"incomplete sample {sample.get('__key__')} ({', '.join(sorted(sample))})")
            continue
        try:
            record = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as exn:
            stats.sample_error(url, f"bad json in {sample['__key__']}: {exn}")
            continue
        target = None
        if select is not None:
            target = select(record)
            if target is None:
                stats.d["dropped"] += 1
                continue
        try:
            image = decode_npy(sample["npy"]) if ext == "npy" else decode_png(sample["png"])
            if image_size is not None and image.shape != (image_size, image_size):
                _note_resize(image.shape, image_size)
                image = _resize(image, image_size)
        except Exception as exn:  # noqa: BLE001 - any decoder failure on hostile bytes is a skip
            stats.sample_error(url, f"bad {ext} in {sample['__key__']}: {type(exn).__name__}")
            continue
        stats.since_sample = 0
        yield image, target, sample["__key__"], record


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY\x01\x00"  # format 1.0, as shards.writer.encode_npy writes it
_NPY_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


@lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape from a .npy 1.0 header (a shard's samples share one: parsed once, then cached)."""
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header))  # magic already read
    if fortran or len(shape) != 2 or dtype not in _NPY_DTYPES or not 0 < shape[0] * shape[1] <= _MAX_PIXELS:
        raise ValueError(f"npy holds {dtype} {shape}{' (Fortran order)' if fortran else ''}; want 2-D uint8/uint16")
    return dtype, shape


def decode_npy(data: bytes) -> np.ndarray:
    """HxW uint8 (uint16) from a raw shard's `.npy` bytes: a read-only view of `data`, no copy, no pickle."""
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        raise ValueError("not a .npy 1.0 array")
    (n,) = struct.unpack_from("<H", data, 8)
    dtype, shape = _npy_header(bytes(data[8:10 + n]))
    count = shape[0] * shape[1]
    if len(data) != 10 + n + count * dtype.itemsize:
        raise ValueError(f"npy data has {len(data) - 10 - n} bytes for {dtype} {shape}")
    return np.frombuffer(data, dtype, count, 10 + n).reshape(shape)


_resize_noted = False


def _note_resize(shape: tuple, size: int) -> None:
    """Say once per process that samples are resized per sample on the CPU (store at the training size)."""
    global _resize_noted
    if not _resize_noted:
        _resize_noted = True
        log.warning("shards stored at %sx%s px are resized to %d px per sample on the CPU, every epoch; that "
                    "costs about as much as decoding a PNG (benchmarks/bench_shards.py): build them with --size %d",
                    shape[0], shape[1], size, size)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear to size x size; uint16 goes through float so no bits are lost."""
    if image.dtype == np.uint16:
        f = Image.fromarray(image.astype(np.float32), "F").resize((size, size), Image.Resampling.BILINEAR)
        return np.clip(np.rint(np.asarray(f)), 0, 65535).astype(np.uint16)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def decode_png(data: bytes) -> np.ndarray:
    """uint8 HxW from PNG bytes: the fast path for what shards.writer writes; PIL only for other layouts.

    Decoding is most of a PNG reader's CPU time, paid every epoch. The writer's PNGs are 8-bit gray
    with the Up filter on every row, so un-filtering is one cumulative sum mod 256. benchmarks/bench_shards.py
    measures it against torchvision.io.decode_png (libpng) and PIL on the same shards: it is the fastest of the
    three here (docs/RESULTS.md), so it is the one decoder of shards; PIL remains for PNGs in layouts the writer
    never makes (other filters, palettes), for correctness only. The zlib stream must end exactly at
    h*(w+1) bytes with its Adler-32 checked, or it raises.
    """
    image = _decode_up_png(data)
    if image is not None:
        return image
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im if im.mode == "L" else im.convert("L"), dtype=np.uint8)


def _decode_up_png(data: bytes) -> np.ndarray | None:
    """The fast path; None when the PNG is not in the writer's layout (then PIL decodes it)."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, idat, shape = len(_PNG_SIGNATURE), [], None
    while pos + 12 <= len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if len(body) != n:
            return None
        if kind == b"IHDR":
            if n != 13:
                return None
            w, h, depth, *layout = struct.unpack(">IIBBBBB", body)
            if depth not in (8, 16) or layout != [0, 0, 0, 0] or not 0 < w * h <= _MAX_PIXELS:
                return None  # 8- or 16-bit gray, no interlace
            shape = (h, w)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    if shape is None or not idat:
        return None
    h, w = shape
    row = w * depth // 8
    z = zlib.decompressobj()
    raw = z.decompress(b"".join(idat), h * (row + 1) + 1)
    if len(raw) != h * (row + 1) or not z.eof:
        raise ValueError("PNG image data has the wrong length or a bad checksum")
    rows = np.frombuffer(raw, np.uint8).reshape(h, row + 1)
    if rows[0, 0] != 0 or (rows[1:, 0] != 2).any():
        return None  # other filters: let PIL do it
    out = np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8)  # Up filter: byte += byte above, mod 256
    return out if depth == 8 else out.view(">u2").astype(np.uint16)


@dataclass
class _Piece:
    """What a reader hands the loader: one batch (in eval mode maybe part of one) and its stats delta.

    `image` is uint8 (uint16) [b,1,H,W], filled in place from the decoded samples (in a DataLoader worker
    straight into shared memory, so it reaches the main process without another copy). `pin_memory` pins
    the pixels only (DataLoader's pin thread would otherwise walk every record).
    """
    image: torch.Tensor | None
    targets: list
    keys: list
    records: list
    groups: list | None
    stats: dict

    def pin_memory(self, device=None):
        if self.image is not None:
            self.image = self.image.pin_memory()
        return self

    def __len__(self) -> int:
        return len(self.keys)


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    """[b,1,H,W] from HxW arrays: one copy, into shared memory when in a DataLoader worker (as default_collate)."""
    first = images[0]
    if any(im.shape != first.shape for im in images):
        shapes = sorted({im.shape for im in images})
        raise UserError(f"one batch holds images of sizes {shapes[:3]}: give image_size to resize them")
    dtype = torch.uint16 if first.dtype == np.uint16 else torch.uint8
    shape = (len(images), 1, *first.shape)
    proto = torch.empty(0, dtype=dtype)
    if get_worker_info() is not None:
        storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
        out = proto.new(storage).view(shape)
    else:
        out = torch.empty(shape, dtype=dtype)
    view = out.numpy()
    for i, im in enumerate(images):
        view[i, 0] = im
    return out


def _piece(samples: list[tuple], stats: dict) -> _Piece:
    if not samples:
        return _Piece(None, [], [], [], None, stats)
    return _Piece(_stack([s[0] for s in samples]), [s[1] for s in samples], [s[2] for s in samples],
                  [s[3] for s in samples], [s[4] for s in samples] if len(samples[0]) > 4 else None, stats)


def _batches(samples: Iterator[tuple], size: int, partial: bool, stats: _WorkerStats) -> Iterator[_Piece]:
    """Yield pieces of `size` samples; a final empty piece carries errors after the last batch."""
    batch: list = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield _piece(batch, stats.delta())
            batch = []
    if batch and partial:
        yield _piece(batch, stats.delta())
    yield _piece([], stats.delta())


class ShardStream(IterableDataset):
    """One rank's stream of sample lists; each DataLoader worker takes its share in `__iter__`."""

    def __init__(self, urls: list[str], *, mode: str, batch_size: int, select, image_size, shuffle_buffer: int,
                 seed: int, rank: int, world_size: int, groups: list[MixGroup] | None = None):
        super().__init__()
        self.groups = groups if mode == "train" else None
        self.urls, self.mode, self.batch_size = urls, mode, batch_size
        self.select, self.image_size, self.shuffle_buffer = select, image_size, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # The epoch the next __iter__ streams. StreamLoader sets it before workers start; a persistent
        # worker's copy then counts on by itself, one __iter__ per epoch (StreamLoader keeps them in step).
        self.epoch = 0

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = _WorkerStats()
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self._stream(worker, num_workers, stats, epoch)

    def _stream(self, worker: int, num_workers: int, stats: _WorkerStats, epoch: int):
        if self.groups:
            decoded = self._mixed(worker, stats, epoch)
            if self.shuffle_buffer > 1:
                rng = random.Random(_seed(self.seed, self.rank, worker, epoch, 1))
                decoded = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(decoded)
            return _batches(decoded, self.batch_size, partial=False, stats=stats)
        if self.mode == "train":
            worker_seed = _seed(self.seed, self.rank, worker, epoch)
            urls = wds.ResampledShards(self.urls, seed=self.seed, worker_seed=lambda: worker_seed,
                                       deterministic=True)
            urls = _count_shards(iter(urls), stats, limit=max(100, 10 * len(self.urls)))
        else:
            slots, me = self.world_size * num_workers, self.rank * num_workers + worker
            mine = self.urls[self.rank::self.world_size][worker::num_workers] if len(self.urls) >= slots else self.urls
            urls = iter([{"url": u} for u in mine])
        streams = url_opener(urls, handler=stats.shard_error)
        files = tar_file_expander(streams, handler=stats.shard_error)
        samples = group_by_keys(files, handler=stats.shard_error)
        if self.mode == "eval" and len(self.urls) < slots:
            samples = _stride(samples, me, slots)
        decoded = _decode(samples, stats, self.select, self.image_size)
        if self.mode == "train" and self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, self.rank, worker, epoch, 1))
            decoded = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(decoded)
        return _batches(decoded, self.batch_size, partial=self.mode == "eval", stats=stats)


    def _group_samples(self, gi: int, group: MixGroup, worker: int, stats: _WorkerStats, epoch: int) -> Iterator[tuple]:
        worker_seed = _seed(self.seed, self.rank, worker, epoch, 100 + gi)
        urls = wds.ResampledShards(list(group.urls), seed=self.seed, worker_seed=lambda: worker_seed,
                                   deterministic=True)
        urls = _count_shards(iter(urls), stats, limit=max(100, 10 * len(group.urls)))
        files = tar_file_expander(url_opener(urls, handler=stats.shard_error), handler=stats.shard_error)
        for image, target, key, record in _decode(group_by_keys(files, handler=stats.shard_error), stats,
                                                  self.select, self.image_size):
            yield image, target, key, record, group.name

    def _mixed(self, worker: int, stats: _WorkerStats, epoch: int) -> Iterator[tuple]:
        """The next sample comes from group g with probability weight(g): an endless, seeded stream."""
        streams = [self._group_samples(i, g, worker, stats, epoch) for i, g in enumerate(self.groups)]
        weights = [g.weight for g in self.groups]
        rng = random.Random(_seed(self.seed, self.rank, worker, epoch, 2))
        order = list(range(len(streams)))
        while True:
            yield next(streams[rng.choices(order, weights)[0]])


def _identity(x):
    return x


class StreamLoader:
    """Iterable over dict batches; `stats` counts what was skipped, `len()` is the train epoch length.

    Batches hold `image` as the stored integers, uint8 (uint16 for 16-bit shards) [B,1,H,W]: 4x fewer
    bytes to move than float; `images_to_float` converts them on the device. With workers, the workers
    persist across epochs (no re-spawn, re-import and re-open per epoch); with `pin_memory` the pixels are
    pinned by the DataLoader's pin thread, so `.to(cuda, non_blocking=True)` is an asynchronous copy.
    """

    def __init__(self, dataset: ShardStream, *, num_workers: int, batches_per_epoch: int | None,
                 pin_memory: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        self.batches_per_epoch = batches_per_epoch
        self.pin_memory = pin_memory
        self.stats = StreamStats()
        self.epoch = 0
        self._loader = None
        self._next_worker_epoch = None  # the epoch that live persistent workers stream next

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch` (shard and sample order derive from it): for resuming."""
        self.epoch = epoch

    def describe(self) -> dict:
        """What a run should record to reproduce its data order."""
        d = self.dataset
        mix = {"mixture": [{"name": g.name, "weight": g.weight, "shards": len(g.urls)} for g in d.groups]} \
            if d.groups else {}
        return {**mix, "mode": d.mode, "shards": len(d.urls), "batch_size": d.batch_size, "image_size": d.image_size,
                "rank": d.rank, "world_size": d.world_size, "num_workers": self.num_workers, "seed": d.seed,
                "shuffle_buffer": d.shuffle_buffer, "batches_per_epoch": self.batches_per_epoch, "epoch": self.epoch}

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an eval-mode loader has no fixed length; it yields every sample once")
        return self.batches_per_epoch

    def _epoch_loader(self) -> DataLoader:
        """The DataLoader for epoch `self.epoch`: the live one when its workers stream exactly that epoch next."""
        if self._loader is None or (self.num_workers > 0 and self._next_worker_epoch != self.epoch):
            self._loader = None  # joins the old workers (set_epoch jumped)
            self.dataset.epoch = self.epoch  # copied into the workers as they start
            self._loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                      collate_fn=_identity, persistent_workers=self.num_workers > 0,
                                      pin_memory=self.pin_memory)
        self.dataset.epoch = self.epoch  # num_workers=0 iterates this very object
        self._next_worker_epoch = self.epoch + 1
        return self._loader

    def __iter__(self) -> Iterator[dict]:
        loader = self._epoch_loader()
        self.epoch += 1
        select = self.dataset.select is not None
        if self.batches_per_epoch is not None:
            yield from self._train_epoch(loader, select)
        else:
            yield from self._eval_epoch(loader, select)
        if self.stats.skipped:
            log.warning("shard stream: %d samples so far, skipped %d (shard errors %d, sample errors %d)",
                        self.stats.samples, self.stats.skipped, self.stats.shard_errors, self.stats.sample_errors)

    def _emit(self, piece: _Piece, select: bool) -> dict:
        self.stats.samples += len(piece)
        self.stats.batches += 1
        if piece.groups:
            self.stats.mix.update(piece.groups)
        return collate(piece, select)

    def realised_mix(self) -> dict[str, dict]:
        """Per mixture group: samples this rank has yielded, their fraction, and the target weight.

        {} for a plain (unmixed) loader. Local to this rank; `realised_mix_all_ranks` sums over ranks.
        """
        groups = self.dataset.groups or []
        total = sum(self.stats.mix.values())
        return {g.name: {"samples": self.stats.mix[g.name], "target": g.weight,
                         "fraction": self.stats.mix[g.name] / total if total else 0.0} for g in groups}

    def mix_metrics(self) -> dict[str, float]:
        """Flat metrics for a log row: `mix/<group>` = realised fraction on this rank; {} when unmixed."""
        return {f"mix/{name}": round(v["fraction"], 4) for name, v in self.realised_mix().items()}

    def _train_epoch(self, loader: DataLoader, select: bool) -> Iterator[dict]:
        done = 0
        it = iter(loader)
        try:
            for piece in it:
                self.stats.merge(piece.stats)
                if len(piece):
                    yield self._emit(piece, select)
                    done += 1
                    if done == self.batches_per_epoch:
                        return
        finally:
            del it
        raise RuntimeError(f"train stream ended after {done} of {self.batches_per_epoch} batches")

    def _eval_epoch(self, loader: DataLoader, select: bool) -> Iterator[dict]:
        """Workers' pieces re-cut into batches of exactly batch_size (the last may be partial); a full piece
        passes through untouched, only the workers' partial last pieces are joined (one copy)."""
        size = self.dataset.batch_size
        buf: list[_Piece] = []
        held = 0
        for piece in loader:
            self.stats.merge(piece.stats)
            if not len(piece):
                continue
            buf.append(piece)
            held += len(piece)
            while held >= size:
                out, buf = _take(buf, size, self.pin_memory)
                held -= size
                yield self._emit(out, select)
        if held:
            yield self._emit(_take(buf, held, self.pin_memory)[0], select)


def _take(pieces: list[_Piece], n: int, pin: bool) -> tuple[_Piece, list[_Piece]]:
    """The first n samples of `pieces` as one piece, and the rest."""
    if len(pieces[0]) == n:
        return pieces[0], pieces[1:]
    out, rest, need = [], list(pieces), n
    while need:
        p = rest.pop(0)
        if len(p) > need:
            rest.insert(0, _Piece(p.image[need:], p.targets[need:], p.keys[need:], p.records[need:],
                                  p.groups[need:] if p.groups else None, {}))
            p = _Piece(p.image[:need], p.targets[:need], p.keys[:need], p.records[:need],
                       p.groups[:need] if p.groups else None, {})
        out.append(p)
        need -= len(p)
    image = torch.cat([p.image for p in out])
    joined = _Piece(image.pin_memory() if pin else image, [t for p in out for t in p.targets],
                    [k for p in out for k in p.keys], [r for p in out for r in p.records],
                    [g for p in out for g in p.groups] if out[0].groups else None, {})
    return joined, rest


def collate(piece: _Piece, select: bool = True) -> dict[str, Any]:
    """A piece -> {"image": uint8 (uint16) [B,1,H,W], "target", "key", "record"[, "group"]}.

    Targets go through torch's default_collate when `select` gave them (else None). Mixture batches add
    "group" (the group name per sample). `images_to_float` turns "image" into [0,1] floats.
    """
    out = {
        "image": piece.image,
        "target": default_collate(piece.targets) if select else None,
        "key": piece.keys,
        "record": piece.records,
    }
    if piece.groups:
        out["group"] = piece.groups
    return out


_INTEGER_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def images_to_float(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A batch's integer images -> float32 in [0, 1] on `device`: the integers move (non-blocking from
    pinned memory), then are converted there. Float input is only moved and cast."""
    if images.dtype == torch.uint16 and device is not None and torch.device(device).type != "cpu":
        # uint16 has only bare-bones kernels off the CPU: move the bits as int16, widen there
        x = images.view(torch.int16).to(device, non_blocking=True).int().bitwise_and_(0xFFFF)
        return x.float().div_(65535.0)
    x = images if device is None else images.to(device, non_blocking=True)
    scale = _INTEGER_SCALE.get(x.dtype)
    return x.float().div_(scale) if scale else x.float()


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """rank/world_size: given, else torch.distributed if initialised, else RANK/WORLD_SIZE, else 0/1."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return (r if rank is None else rank), (w if world_size is None else world_size)


def make_loader(urls: str | Iterable[str], *, mode: str, batch_size: int,
                select: Callable[[dict], Any] | None = None, image_size: int | None = None,
                epoch_size: int | None = None, num_workers: int = 2, shuffle_buffer: int = 1000, seed: int = 0,
                rank: int | None = None, world_size: int | None = None,
                pin_memory: bool | None = None) -> StreamLoader:
    """Stream shards as dict batches {"image", "target", "key", "record"}; see the module docstring.

    `urls` is a plain shard spec or a mixture (`parse_mixture`: `nih=0.5:'A/*.tar' chexpert=0.5:'B/*.tar'`);
    a mixture's batches also carry "group", and `loader.realised_mix()` says what was drawn.

    `select(record_json)` returns the target or None to drop the sample; with select=None every sample
    is kept and "target" is None. `image_size` resizes (bilinear) to a square; None keeps the stored
    size (which must then be uniform). With num_workers > 0 and a spawn start method, `select` must be
    picklable (a module-level function). `image` is uint8 (uint16 for 16-bit shards): convert with
    `images_to_float(batch["image"], device)`. `pin_memory` (default: when CUDA is available) pins it.
    """
    if mode not in MODES:
        raise UserError(f"mode {mode!r}: want one of {MODES}")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: must be at least 1")
    if image_size is not None and image_size < 1:
        raise UserError(f"image size {image_size}: must be positive")
    if num_workers < 0:
        raise UserError(f"num_workers {num_workers}: must be >= 0")
    rank, world_size = dist_info(rank, world_size)
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    url_list = expand_urls(urls)
    groups = getattr(url_list, "groups", None)
    url_list = list(url_list)
    batches = None
    if mode == "train":
        if not epoch_size:
            raise UserError("train mode needs epoch_size (samples per epoch over all ranks)")
        batches = epoch_size // (world_size * batch_size)
        if batches < 1:
            raise UserError(f"epoch size {epoch_size} is smaller than world size x batch size "
                            f"({world_size} x {batch_size}); no full batch per rank")
    dataset = ShardStream(url_list, mode=mode, batch_size=batch_size, select=select, image_size=image_size,
                          shuffle_buffer=shuffle_buffer, seed=seed, rank=rank, world_size=world_size, groups=groups)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return StreamLoader(dataset, num_workers=num_workers, batches_per_epoch=batches, pin_memory=pin_memory)


def shard_paths(folder: str | Path, split: str) -> list[str]:
    """All shards of one split in a shard folder, sorted: the usual argument to `make_loader`."""
    return expand_urls([str(Path(folder) / f"{split}-*.tar")])


def realised_mix_all_ranks(loader: StreamLoader) -> dict[str, dict]:
    """`loader.realised_mix()` summed over all ranks (an all-reduce: every rank must call it together).

    Without an initialised process group it is the local mix.
    """
    local = loader.realised_mix()
    if not local or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    names = list(local)
    counts = torch.tensor([float(local[n]["samples"]) for n in names], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        counts = counts.cuda()
    torch.distributed.all_reduce(counts)
    total = float(counts.sum())
    return {n: {"samples": int(c), "target": local[n]["target"], "fraction": float(c) / total if total else 0.0}
            for n, c in zip(names, counts.tolist())}
