"""Models Genesis corruptions in 2D, for whole batches on the training device.

The reference (MrGiovanni/ModelsGenesis `pytorch/utils.py`) corrupts one 3D sample at a time in numpy, with a
pure-Python loop of 10,000 shuffle blocks; that is far too slow to feed a GPU. Here one call corrupts a
[B, 1, H, W] tensor, with per-sample randomness drawn from one `torch.Generator`, in the reference's order and
with its probabilities and ranges (all configurable in `GenesisConfig`):

1. flip input and target together, up to `max_flips` times, each while rand < `flip_prob`;
2. local pixel shuffling (prob `local_shuffle_prob`): pixels are permuted inside small blocks of side
   1..dim*`block_max_frac`;
3. a cubic Bezier intensity mapping through (0,0), two U[0,1)^2 control points and (1,1) (prob
   `nonlinear_prob`), decreasing with prob `inverse_prob`;
4. painting (prob `paint_prob`): in-painting (prob `inpaint_prob`) fills up to `inpaint_max_boxes` boxes with
   U[0,1) noise; otherwise out-painting fills everything with noise and restores 1 + up to
   `outpaint_max_extra` windows from the image.

Where the batched version differs from the reference, and why:

* Local shuffling. The reference pastes overlapping blocks one after another (each one a shuffled copy of
  the ORIGINAL pixels under it), which is inherently sequential. Here each shuffled sample is tiled by a
  random layout instead: columns are cut into bands of width U{1..d}, each band into cells of height U{1..d},
  so cell sides follow the reference's block-side distribution. A cell is shuffled with the probability that
  the reference's `n_blocks` blocks cover its pixels (averaged over the cell; computed exactly from the block
  size and position distributions, border fall-off included), so the displaced fraction of pixels matches.
  Within a shuffled cell the pixels follow a uniform random permutation taken from a bank of `perm_bank`
  fresh permutations per cell shape and call (one segmented sort; fewer for large cells, at most
  PERM_TABLE_MAX keys per call, so at 224 px one per shape), chosen per cell.
* Flips pick among the two spatial axes (the 3D reference's `random.choice([0, 1, 2])` also picks the size-1
  channel axis, a no-op).
* The Bezier curve is inverted per sample into a monotone lookup table of `lut_size` bins, read by
  truncation (the reference interpolates 100,000 curve points per sample).
* Noise is U[0,1) on a 2^-16 grid, cut from raw 64-bit draws (torch.rand is several times slower on CPU).

How a call runs: every random decision of the batch is drawn first, as small per-sample tensors (flip axes,
cell layouts and permutations, lookup tables, boxes). The pixels are then made a chunk of samples at a time:
the whole batch on a GPU; on CPU `cpu_chunk_pixels()` pixels, sized from the core's own cache as the OS reports
it (runkit.cpu: L2 / CHUNK_BYTES_PER_PIXEL), so that a chunk's intermediates stay in cache,
and painting copies rectangles instead of building a mask. Results do not depend on the chunk size or
the painting kernel (tests check both). The pretraining entry point also keeps freed memory in the heap
(`runkit.allocator`): whole-batch tensors otherwise page-fault on every call.

Speed: benchmarks/bench_transforms.py times it against the numpy port of the reference, one CPU thread;
the README has the figures. On CUDA pass a CUDA generator. A few host syncs remain per call (subset sizes,
band counts, the per-sample decisions).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from runkit.errors import UserError

# The reference's 10,000 blocks of mean size 3.5 x 3.5 x 2 voxels in a 64 x 64 x 32 cube: each voxel is
# covered ~1.87 times on average. The 2D default keeps that coverage, whatever the image size.
REFERENCE_BLOCK_COVERAGE = 10_000 * 3.5 * 3.5 * 2.0 / (64 * 64 * 32)
PERM_TABLE_MAX = 1 << 16
# CPU: a chunk's float/int32 intermediates take about this many bytes per pixel, so a chunk gets
# (per-core cache) / CHUNK_BYTES_PER_PIXEL pixels. Measured on a 2 MiB-L2 Xeon (benchmarks/bench_transforms.py
# --chunk-sweep): at 224 px one sample per chunk (50,176 px) runs 13-25 % faster than two, and at 128 px
# 1..128 samples are within noise, which puts the working set between 21 and 41 bytes per pixel.
CHUNK_BYTES_PER_PIXEL = 32
# when the OS does not say (the value a 2 MiB L2 gives)
DEFAULT_CHUNK_PIXELS = 1 << 16
# Bezier tables are computed exactly on up to this many bins, then upsampled linearly
LUT_EXACT_SIZE = 1024


@lru_cache(maxsize=1)
def cpu_chunk_pixels() -> int:
    """Pixels per CPU chunk on this machine: the cache private to one core (runkit.cpu, read from the OS)
    over CHUNK_BYTES_PER_PIXEL, or DEFAULT_CHUNK_PIXELS when the OS reports no cache."""
    from runkit.cpu import core_cache_bytes

    cache = core_cache_bytes()
    return max(1024, cache // CHUNK_BYTES_PER_PIXEL) if cache else DEFAULT_CHUNK_PIXELS


def _floor_frac(dim: int, frac: float) -> int:
    """floor(dim * frac) that matches the reference's integer `a*dim//b` despite float rounding."""
    return math.floor(dim * frac + 1e-9)


@dataclass
class GenesisConfig:
    """Every probability and range of the Models Genesis corruptions (reference values by default)."""

    flip_prob: float = 0.4
    max_flips: int = 3
    local_shuffle_prob: float = 0.5
    # None: as many blocks as give the reference's coverage (~1.87 x image area), e.g. ~725 at 128 px and
    # ~710 at 224 px; the batched version turns it into a per-cell shuffle probability.
    n_blocks: int | None = None
    block_coverage: float = REFERENCE_BLOCK_COVERAGE
    block_max_frac: float = 0.1            # block side randint(1, dim//10)
    # fresh random permutations per cell shape and call (batched only); large cells (224 px and up) use
    # fewer, so that one call sorts at most PERM_TABLE_MAX keys
    perm_bank: int = 8
    nonlinear_prob: float = 0.9
    inverse_prob: float = 0.5
    lut_size: int = 4096                   # Bezier lookup-table entries (batched only)
    paint_prob: float = 0.9
    inpaint_prob: float = 0.2              # else out-painting (0.8)
    inpaint_max_boxes: int = 5
    inpaint_frac: tuple[float, float] = (1 / 6, 1 / 3)     # box side randint(dim//6, dim//3)
    outpaint_max_extra: int = 4
    outpaint_cut_frac: tuple[float, float] = (3 / 7, 4 / 7)  # window side dim - randint(3*dim//7, 4*dim//7)
    more_box_prob: float = 0.95            # each further in-painting box / out-painting window
    border: int = 3                        # boxes and windows keep this many pixels from the border

    def __post_init__(self):
        self.inpaint_frac = tuple(float(v) for v in self.inpaint_frac)
        self.outpaint_cut_frac = tuple(float(v) for v in self.outpaint_cut_frac)
        self.validate()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> GenesisConfig:
        """Build from a (YAML) mapping; an unknown key or a bad value is a UserError naming it."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown Genesis transform option(s) {unknown} (known: {', '.join(sorted(known))})")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise UserError(f"bad Genesis transform option: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inpaint_frac"] = list(self.inpaint_frac)
        d["outpaint_cut_frac"] = list(self.outpaint_cut_frac)
        return d

    def validate(self) -> None:
        for name in ("flip_prob", "local_shuffle_prob", "nonlinear_prob", "inverse_prob", "paint_prob",
                     "inpaint_prob", "more_box_prob"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
                raise UserError(f"Genesis option {name} must be a probability in [0, 1], got {v!r}")
        for name, lo in (("max_flips", 0), ("inpaint_max_boxes", 1), ("outpaint_max_extra", 0), ("border", 0),
                         ("perm_bank", 1), ("lut_size", 16)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UserError(f"Genesis option {name} must be an integer >= {lo}, got {v!r}")
        if self.n_blocks is not None and (not isinstance(self.n_blocks, int) or self.n_blocks < 0):
            raise UserError(f"Genesis option n_blocks must be null or an integer >= 0, got {self.n_blocks!r}")
        if not 0.0 < self.block_max_frac <= 0.5:
            raise UserError(f"Genesis option block_max_frac must be in (0, 0.5], got {self.block_max_frac!r}")
        if self.block_coverage < 0:
            raise UserError(f"Genesis option block_coverage must be >= 0, got {self.block_coverage!r}")
        for name in ("inpaint_frac", "outpaint_cut_frac"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi < 1.0:
                raise UserError(f"Genesis option {name} must be [lo, hi] with 0 < lo <= hi < 1, got {[lo, hi]}")

    # Integer ranges (inclusive, like random.randint) for one image axis of size `dim`.
    def block_range(self, dim: int) -> tuple[int, int]:
        return 1, max(1, _floor_frac(dim, self.block_max_frac))

    def inpaint_range(self, dim: int) -> tuple[int, int]:
        return max(1, _floor_frac(dim, self.inpaint_frac[0])), max(1, _floor_frac(dim, self.inpaint_frac[1]))

    def outpaint_range(self, dim: int) -> tuple[int, int]:
        """Side of a restored window: dim - randint(cut_lo, cut_hi)."""
        return dim - _floor_frac(dim, self.outpaint_cut_frac[1]), dim - _floor_frac(dim, self.outpaint_cut_frac[0])

    def blocks_for(self, h: int, w: int) -> int:
        """Number of shuffle blocks for an h x w image: `n_blocks`, or the reference's coverage scaled to 2D."""
        if self.n_blocks is not None:
            return self.n_blocks
        mean_area = sum(self.block_range(h)) / 2 * sum(self.block_range(w)) / 2
        return round(self.block_coverage * h * w / mean_area)

    def check_size(self, h: int, w: int) -> None:
        for dim in (h, w):
            need = max(self.inpaint_range(dim)[1], self.outpaint_range(dim)[1]) + 2 * self.border
            if dim < need or dim < 8:
                raise UserError(f"image side {dim} is too small for the Genesis boxes (needs >= {max(need, 8)} px)")


class _Draw:
    """All random numbers of one call, from one generator on the data's device (so runs are repeatable)."""

    def __init__(self, generator: torch.Generator | None, device: torch.device):
        if generator is not None and torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device} but the images are on {device}")
        self.g = generator
        self.device = device
        self._half = torch.tensor(0.5, dtype=torch.float32, device=device)

    def rand(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g, device=self.device, dtype=dtype)

    def noise(self, n: int, h: int, w: int, out: torch.Tensor) -> torch.Tensor:
        """U[0,1) noise for n images of h x w, written into `out`: 0.5 + v / 2^16 for random int16 v, a 2^-16
        grid (finer than 8-bit images need). The int16 come four to a raw 64-bit draw, and the conversion is
        one fused op: several times faster than torch.rand on CPU. Each image takes ceil(h*w/4) draws, so
        the values do not depend on how many images one call makes."""
        per = (h * w + 3) // 4
        bits = torch.empty((n, per), dtype=torch.int64, device=self.device)
        bits.random_(-(2 ** 63), None, generator=self.g)             # all 64 bits (the default leaves the top one 0)
        v = bits.view(torch.int16)[:, :h * w].view(n, h, w)
        return torch.add(self._half, v, alpha=2.0 ** -16, out=out)

    def randint(self, lo: int, hi: int, shape, dtype=torch.int64) -> torch.Tensor:
        """Inclusive bounds, like random.randint."""
        return torch.randint(lo, hi + 1, shape, generator=self.g, device=self.device, dtype=dtype)


# ----------------------------------------------------------------------------------------------- flips
def _flip_plan(b: int, cfg: GenesisConfig, d: _Draw) -> list[int]:
    """Per sample: 0 no flip, 1 rows, 2 columns, 3 both (input and target get the same flips)."""
    if cfg.max_flips == 0 or cfg.flip_prob == 0:
        return [0] * b
    u = d.rand(b, cfg.max_flips)
    axis = d.randint(0, 1, (b, cfg.max_flips))                 # 0: rows (H), 1: columns (W)
    active = torch.cumprod((u < cfg.flip_prob).long(), dim=1)  # flip k happens while every draw so far < p
    n_h = (active * (axis == 0)).sum(1)
    n_w = (active * (axis == 1)).sum(1)
    return ((n_h % 2 == 1).long() + 2 * (n_w % 2 == 1).long()).tolist()


_FLIP_DIMS = {1: (-2,), 2: (-1,), 3: (-2, -1)}


# -------------------------------------------------------------------------------------- local shuffling
@lru_cache(maxsize=32)
def _coverage_map(h: int, w: int, n_blocks: int, dh: int, dw: int) -> np.ndarray:
    """P(a pixel is under at least one of the reference's n_blocks blocks), with its border fall-off."""

    def axis_cover(dim: int, dmax: int) -> np.ndarray:
        pos = np.arange(dim)
        c = np.zeros(dim)
        for s in range(1, dmax + 1):                       # block side s, start uniform in [0, dim - s]
            starts = dim - s + 1
            lo = np.maximum(0, pos - s + 1)
            hi = np.minimum(pos, dim - s)
            c += (hi - lo + 1) / starts
        return c / dmax

    one = np.outer(axis_cover(h, dh), axis_cover(w, dw))
    return (1.0 - (1.0 - one) ** n_blocks).astype(np.float32)


@lru_cache(maxsize=32)
def _coverage_sat(h: int, w: int, n_blocks: int, dh: int, dw: int, device: str) -> torch.Tensor:
    """The flat summed-area table [(h+1)*(w+1)] of `_coverage_map`, on the device."""
    sat = torch.zeros(h + 1, w + 1, dtype=torch.float64)
    sat[1:, 1:] = torch.from_numpy(_coverage_map(h, w, n_blocks, dh, dw)).double().cumsum(0).cumsum(1)
    return sat.view(-1).to(device)


@lru_cache(maxsize=32)
def _shape_segments(dh: int, dw: int, W: int, bank: int, device: str):
    """Static layout of the displacement table: one segment per (bank p, h, w) cell shape, whose entry i
    will say where local pixel i of an h x w cell takes its value from.

    Returns (segment ids shifted into the high bits of int32 sort keys, the number of random low bits,
    each entry's own flat offset from its cell's corner at image width W, the segment offsets)."""
    seg, own, offsets = [], [], np.zeros((bank, dh + 1, dw + 1), dtype=np.int64)
    pos = 0
    for p in range(bank):
        for hh in range(1, dh + 1):
            for ww in range(1, dw + 1):
                n = hh * ww
                offsets[p, hh, ww] = pos
                seg.append(np.full(n, len(seg), dtype=np.int64))
                ii = np.arange(n)
                own.append((ii // ww) * W + ii % ww)
                pos += n
    rand_bits = 31 - max(1, (len(seg) - 1).bit_length())
    keys = torch.from_numpy(np.concatenate(seg) << rand_bits).to(torch.int32).to(device)
    own = torch.from_numpy(np.concatenate(own)).to(torch.int32).to(device)
    return keys, rand_bits, own, torch.from_numpy(offsets).to(device)


def _displacement_table(dh: int, dw: int, W: int, bank: int, d: _Draw, zero_len: int):
    """int32 [zero_len zeros | per-shape displacements]: every segment holds a fresh uniform random
    permutation, turned into flat-index displacements for image width W.

    The permutations come from one sort of int32 keys (segment id in the high bits, random low bits): a
    radix sort, ~3x faster than sorting float64 segment + U[0,1) keys. A tie between two random keys of
    one segment (at most a few % of the largest segments have one) only keeps those two pixels in order.
    Entry e of a segment then reads the pixel at offset own[order[e]], e.g. displaced by
    own[order[e]] - own[e]."""
    seg_keys, rand_bits, own, offsets = _shape_segments(dh, dw, W, bank, str(d.device))
    keys = seg_keys | d.randint(0, (1 << rand_bits) - 1, (seg_keys.numel(),), dtype=torch.int32)
    delta = own.index_select(0, torch.argsort(keys)).sub_(own)
    table = torch.cat([torch.zeros(zero_len, dtype=torch.int32, device=d.device), delta])
    return table, offsets + zero_len


_ARANGE: dict[str, torch.Tensor] = {}


def _arange_i32(n: int, device: torch.device) -> torch.Tensor:
    """A cached int32 arange (one per device, grown on demand): saves a full pass per call."""
    key = str(device)
    if key not in _ARANGE or _ARANGE[key].numel() < n:
        _ARANGE[key] = torch.arange(n, device=device, dtype=torch.int32)
    return _ARANGE[key][:n]


def _shuffle_layout(S: int, H: int, W: int, cfg: GenesisConfig, d: _Draw) -> dict:
    """The random cell layouts and permutations of S shuffled samples, as small index tensors that
    `_shuffle_values` turns into pixels (for any subset of the S, so the batch can be cut into chunks)."""
    dh, dw = cfg.block_range(H)[1], cfg.block_range(W)[1]
    dev = d.device
    # Column bands of width U{1..dw}; K is large enough that falling short of W is ~1e-8 likely, and a
    # sentinel band (index K) takes any remainder, unshuffled.
    K = min(W, math.ceil(1.5 * W / ((1 + dw) / 2)) + 8)
    M = min(H, math.ceil(1.5 * H / ((1 + dh) / 2)) + 8)
    bw = d.randint(1, dw, (S, K))
    bh = d.randint(1, dh, (S, K + 1, M))
    u_cell = d.rand(S, K + 1, M + 1)
    u_bank = d.rand(S, K + 1, M + 1)
    # Keep only as many bands / cells as some sample needs to reach the border (one host sync each):
    # it halves the per-band work below.
    K = min(K, int((torch.cumsum(bw, 1) < W).sum(1).max()) + 1)
    M = min(M, int((torch.cumsum(bh, 2) < H).sum(2).max()) + 1)
    bw, bh = bw[:, :K], bh[:, :K + 1, :M]
    u_cell, u_bank = u_cell[:, :K + 1, :M + 1], u_bank[:, :K + 1, :M + 1]

    x_end = torch.cumsum(bw, 1).clamp(max=W)                                          # [S, K]
    x_end = torch.cat([x_end, torch.full((S, 1), W, device=dev, dtype=torch.long)], 1)  # sentinel band
    x0 = torch.cat([torch.zeros((S, 1), device=dev, dtype=torch.long), x_end[:, :-1]], 1)
    width = x_end - x0                                                                # [S, K+1], 0 = empty

    y_end = torch.cumsum(bh, 2).clamp(max=H)
    y_end = torch.cat([y_end, torch.full((S, K + 1, 1), H, device=dev, dtype=torch.long)], 2)
    y0c = torch.cat([torch.zeros((S, K + 1, 1), device=dev, dtype=torch.long), y_end[..., :-1]], 2)
    height = y_end - y0c                                                              # [S, K+1, M+1]

    # Which cells are shuffled: P(covered in the reference) at the cell centre; sentinels never.
    n_blocks = cfg.blocks_for(H, W)
    # the mean coverage over the cell's pixels, from a summed-area table of the coverage map
    sat = _coverage_sat(H, W, n_blocks, dh, dw, str(dev))
    y1, x1 = y_end, x_end[:, :, None]
    y0_, x0_ = y0c, x0[:, :, None]
    area = ((y1 - y0_) * (x1 - x0_)).clamp(min=1)
    total = (sat[y1 * (W + 1) + x1] - sat[y0_ * (W + 1) + x1] - sat[y1 * (W + 1) + x0_]
             + sat[y0_ * (W + 1) + x0_])
    q = (total / area).float()
    on = (u_cell < q) & (height > 0) & (width[:, :, None] > 0)
    on[:, K, :] = False
    on[:, :, M] = False

    per_bank = (dh * (dh + 1) // 2) * (dw * (dw + 1) // 2)
    n_bank = max(1, min(cfg.perm_bank, PERM_TABLE_MAX // per_bank))
    table, offsets = _displacement_table(dh, dw, W, n_bank, d, zero_len=H * W)
    bank = (u_bank * n_bank).long().clamp_(max=n_bank - 1)
    seg = offsets[bank, height.clamp(1, dh), width[:, :, None].clamp(1, dw)]
    base = torch.where(on, seg, torch.zeros_like(seg))                               # identity -> zero region

    # Per (sample, band, row): G = base + (y - y0)*w - x0, so that for pixel (y, x) in that band the table
    # index is x + G, the local index i = (y - y0)*w + (x - x0) inside the cell's segment. Cell and band
    # membership come from boundary counts (scatter + cumsum), cheaper than searchsorted on CPU.
    ys = torch.arange(H, device=dev)
    cuts = torch.zeros(S, K + 1, H + 1, dtype=torch.long, device=dev)
    cuts.scatter_add_(2, y_end[..., :-1], torch.ones_like(y_end[..., :-1]))
    row_cell = torch.cumsum(cuts[..., :H], 2).clamp_(max=M)                           # [S, K+1, H]
    G = (base - y0c * width[:, :, None]).gather(2, row_cell)                          # one gather per row
    G.addcmul_(ys, width[:, :, None]).sub_(x0[:, :, None])
    G = G.transpose(1, 2).to(torch.int32, memory_format=torch.contiguous_format)    # [S, H, K+1]
    bcuts = torch.zeros(S, W + 1, dtype=torch.long, device=dev)
    bcuts.scatter_add_(1, x_end[:, :-1], torch.ones_like(x_end[:, :-1]))
    band = torch.cumsum(bcuts[:, :W], 1).clamp_(max=K)                                # [S, W]

    return {"G": G, "band": band, "table": table}


def _shuffle_values(x: torch.Tensor, layout: dict, rows: slice) -> torch.Tensor:
    """x: [n, H, W], the images of layout rows `rows`. Returns their shuffled copy."""
    n, H, W = x.shape
    G, band = layout["G"][rows], layout["band"][rows]
    # int32 flat indices + index_select: half the memory traffic of int64 gathers on CPU
    idx = G.gather(2, band[:, None, :].expand(n, H, W))                      # expanded index: no copy
    idx.add_(_arange_i32(W, x.device))
    src = layout["table"].index_select(0, idx.view(-1))
    src.add_(_arange_i32(n * H * W, x.device))
    return x.reshape(-1).index_select(0, src).view(n, H, W)


# ------------------------------------------------------------------------------------ Bezier mapping
def _bezier_lut(points: torch.Tensor, size: int, inverse: torch.Tensor) -> torch.Tensor:
    """Per-sample lookup tables [n, size + 1] of v -> y(s(v)) on a uniform grid of v in [0, 1].

    The curve B(s) = (1-s)^3 P0 + 3s(1-s)^2 P1 + 3s^2(1-s) P2 + s^3 P3 with P0=(0,0), P3=(1,1) and control
    points in [0,1]^2 has monotone x(s) and y(s), so the reference's np.sort calls only re-order it: the
    mapping is v -> y(x^-1(v)), or v -> y(1 - x^-1(v)) when inverted (x sorted, y left falling).
    """
    if size > LUT_EXACT_SIZE:
        # The mapping is smooth between grid points: a linear upsampling of the exact 1024-bin table is
        # within ~5e-7 of the exact 4096-bin one on average (6e-4 at worst, where the curve is steepest),
        # at a sixth of the cost.
        base = _bezier_lut(points, LUT_EXACT_SIZE, inverse)
        return F.interpolate(base[:, None], size=size + 1, mode="linear", align_corners=True)[:, 0]
    p = points                                                  # [n, 4]: x1, y1, x2, y2
    n, dev = p.shape[0], p.device
    dense = 1024                                                # x(s) is smooth: linear inverse is exact to ~1e-7

    def coord(c1, c2, t):
        """B(t) = a1 t + a2 t^2 + a3 t^3 (P0 = 0, P3 = 1), by Horner in fused in-place steps."""
        a1, a2, a3 = 3 * c1, 3 * c2 - 6 * c1, 1 + 3 * c1 - 3 * c2
        return torch.addcmul(a2[:, None], a3[:, None], t).mul_(t).add_(a1[:, None]).mul_(t)

    xs = coord(p[:, 0], p[:, 2], torch.linspace(0, 1, dense, device=dev)[None, :])   # [n, dense], non-decreasing
    # entry j holds f(j/size) and serves v in [j/size, (j+1)/size): f(0) and f(1) stay exact.
    # k = #{i: xs_i <= j/size} by a histogram of each x sample's first grid point, then a cumulative sum
    # (cheaper than searchsorted on CPU); xs[k-1] <= j/size < xs[k]
    first = torch.ceil(xs * size).long().clamp_(0, size + 1)            # first j with j/size >= xs_i
    hist = torch.zeros(n, size + 2, device=dev, dtype=torch.long).scatter_add_(1, first, torch.ones_like(first))
    k = torch.cumsum(hist[:, :size + 1], 1).clamp_(1, dense - 1)
    x_lo, x_hi = xs.gather(1, k - 1), xs.gather(1, k)
    grid = torch.arange(size + 1, device=dev, dtype=torch.float32).div_(size)
    frac = (grid - x_lo).div_((x_hi - x_lo).clamp_(min=1e-12)).clamp_(0, 1)
    s_inv = frac.add_(k - 1).mul_(1.0 / (dense - 1)).clamp_(0, 1)      # x^-1(v) = s[k-1] + frac * ds
    s_inv = torch.where(inverse[:, None], 1 - s_inv, s_inv)
    return coord(p[:, 1], p[:, 3], s_inv).clamp_(0, 1)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-sample tables f(j/size), j = 0..size, read at trunc(v*size); x: [S, H, W] in [0, 1]. With 4096
    bins the error is below slope/4096, under 8-bit resolution, and a monotone table stays monotone."""
    S, H, W = x.shape
    L = lut.shape[1]
    i = torch.mul(x.reshape(S, H * W), L - 1).to(torch.int32)      # the bin, exact whatever the sample's row
    if S > 1:
        i.add_(torch.arange(0, S * L, L, device=x.device, dtype=torch.int32)[:, None])
    return lut.to(x.dtype).view(-1).index_select(0, i.view(-1)).view(S, H, W)


# ------------------------------------------------------------------------------------------ painting
def _box_mask(lo: torch.Tensor, size: torch.Tensor, active: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, K] starts/sizes/flags -> [B, K, dim] float 1D indicator of each box along one axis."""
    pos = torch.arange(dim, device=lo.device)
    inside = (pos >= lo[..., None]) & (pos < (lo + size)[..., None]) & active[..., None]
    return inside.float()


def _boxes(n: int, count: int, size_range: tuple[int, int], dim: int, border: int, d: _Draw):
    size = d.randint(size_range[0], size_range[1], (n, count))
    # start randint(border, dim - size - border), per box
    start = border + torch.floor(d.rand(n, count) * (dim - size - 2 * border + 1)).long()
    return start, size


def _paint_plan(B: int, H: int, W: int, cfg: GenesisConfig, d: _Draw) -> dict:
    """Every painting decision of the batch: which samples in- or out-paint, and their boxes / windows."""
    paint = d.rand(B) < cfg.paint_prob
    inpaint = d.rand(B) < cfg.inpaint_prob
    # In-painting: box k is drawn while every "more" draw so far < more_box_prob (the first one too).
    ki = cfg.inpaint_max_boxes
    in_active = torch.cumprod((d.rand(B, ki) < cfg.more_box_prob).long(), 1).bool()
    iy, ih = _boxes(B, ki, cfg.inpaint_range(H), H, cfg.border, d)
    ix, iw = _boxes(B, ki, cfg.inpaint_range(W), W, cfg.border, d)
    # Out-painting: window 0 always, then up to outpaint_max_extra more while draws < more_box_prob.
    ko = cfg.outpaint_max_extra + 1
    more = torch.cumprod((d.rand(B, ko - 1) < cfg.more_box_prob).long(), 1).bool()
    out_active = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=d.device), more], 1)
    oy, oh = _boxes(B, ko, cfg.outpaint_range(H), H, cfg.border, d)
    ox, ow = _boxes(B, ko, cfg.outpaint_range(W), W, cfg.border, d)

    k = max(ki, ko)                         # pad both to a common box count; padding boxes are inactive

    def pad(t):
        return torch.cat([t, t.new_zeros(B, k - t.shape[1])], 1)

    iy, ix, ih, iw, in_active = map(pad, (iy, ix, ih, iw, in_active))
    oy, ox, oh, ow, out_active = map(pad, (oy, ox, oh, ow, out_active))
    do_in, do_out = paint & inpaint, paint & ~inpaint
    # A sample in-paints or out-paints, never both, so one union per sample: its boxes or its windows.
    # Noise weight: the boxes (in-painting), or 1 - the windows (out-painting), or 0 (no painting).
    pick = do_in[:, None]
    ys, hs = torch.where(pick, iy, oy), torch.where(pick, ih, oh)
    xs, ws = torch.where(pick, ix, ox), torch.where(pick, iw, ow)
    act = torch.where(pick, in_active, out_active) & paint[:, None]
    return {"paint": paint, "inpaint": do_in, "outpaint": do_out, "boxes": (ys, xs, hs, ws, act),
            "inpaint_boxes": (iy, ix, ih, iw, in_active), "outpaint_windows": (oy, ox, oh, ow, out_active)}


def _paint_mask(plan: dict, H: int, W: int, rows: slice = slice(None)) -> torch.Tensor:
    """Float {0,1} [n, H, W] for plan rows `rows`: 1 where the corrupted image becomes U[0,1) noise."""
    ys, xs, hs, ws, act = (t[rows] for t in plan["boxes"])
    do_out = plan["outpaint"][rows]
    n = do_out.shape[0]
    # c = box count per pixel; weight = min(c, 1) for in-painting, max(1 - c, 0) for out-painting
    sign = torch.where(do_out, -1.0, 1.0).to(do_out.device)
    r = _box_mask(ys, hs, act, H) * sign[:, None, None]
    return torch.baddbmm(do_out.float()[:, None, None].expand(n, H, W), r.transpose(1, 2),
                         _box_mask(xs, ws, act, W)).clamp_(0.0, 1.0)


def _paint_by_mask(img: torch.Tensor, noise: torch.Tensor, plan: dict, a: int) -> None:
    """Vectorised painting (the GPU path): noise <- lerp(img, noise, mask) for plan rows a..a+n."""
    mask = _paint_mask(plan, img.shape[1], img.shape[2], slice(a, a + img.shape[0]))
    torch.lerp(img, noise, mask.to(img.dtype), out=noise)       # exact: weight 0 keeps, 1 replaces


def _paint_by_boxes(img: torch.Tensor, noise: torch.Tensor, plan: dict, a: int) -> None:
    """The same result as `_paint_by_mask`, built in `noise` by rectangle copies (the CPU path).

    Out-painting samples keep the noise and get their windows copied in from `img`; the others get the
    image copied over the noise, with their in-painting boxes' noise put back. Only those rectangles and
    rows are touched: no mask is built, clamped and read. `img` is left as it was."""
    ys, xs, hs, ws, act = plan["box_lists"]
    outpaint = plan["outpaint_list"]
    for j in range(img.shape[0]):
        i = a + j
        boxes = [(ys[i][k], xs[i][k], hs[i][k], ws[i][k]) for k in range(len(act[i])) if act[i][k]]
        if outpaint[i]:
            for y, x, h, w in boxes:
                noise[j, y:y + h, x:x + w] = img[j, y:y + h, x:x + w]
        else:                                                    # in-painting, or no painting: no boxes
            kept = [noise[j, y:y + h, x:x + w].clone() for y, x, h, w in boxes]
            noise[j] = img[j]
            for (y, x, h, w), v in zip(boxes, kept):
                noise[j, y:y + h, x:x + w] = v


# ----------------------------------------------------------------------------------------- the batch
def genesis_batch(x: torch.Tensor, cfg: GenesisConfig | None = None, generator: torch.Generator | None = None,
                  return_info: bool = False, chunk: int | None = None):
    """[B, 1, H, W] images in [0, 1] -> (corrupted, target), both [B, 1, H, W] with x's dtype and device.

    The target is the (possibly flipped) original; when no sample flips it is `x` itself, not a copy.
    Same generator state -> identical output, whatever `chunk`. With `return_info`, a dict of the
    per-sample decisions is returned as a third element (for tests and plots).

    Every random draw is made first, for the whole batch; the pixels are then produced `chunk` samples at
    a time (default: the whole batch on a GPU, ~`cpu_chunk_pixels()` pixels on CPU, so that a chunk's
    intermediates stay in cache: at 224 px ~20 % faster than whole-batch passes through memory). On CPU
    painting copies rectangles, elsewhere it applies one mask; both give the same result.
    """
    cfg = cfg or GenesisConfig()
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images [B, 1, H, W], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a float tensor in [0, 1], got {x.dtype}")
    B, _, H, W = x.shape
    cfg.check_size(H, W)
    d = _Draw(generator, x.device)
    cpu = x.device.type == "cpu"
    if chunk is None:
        chunk = max(1, cpu_chunk_pixels() // (H * W)) if cpu else B
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of samples, got {chunk!r}")

    # ---- every draw, in the reference's order
    flips = _flip_plan(B, cfg, d)
    do_shuffle = d.rand(B) < cfg.local_shuffle_prob
    shuffled = do_shuffle.nonzero().squeeze(1) if cfg.local_shuffle_prob > 0 else do_shuffle.new_zeros(0).long()
    layout = _shuffle_layout(shuffled.numel(), H, W, cfg, d) if shuffled.numel() else None
    layout_row = [-1] * B                                       # sample -> its row in the shuffle layout
    for r, i in enumerate(shuffled.tolist()):
        layout_row[i] = r
    do_nl = d.rand(B) < cfg.nonlinear_prob
    inverse = d.rand(B) < cfg.inverse_prob
    info: dict[str, Any] = {"shuffle": do_shuffle, "nonlinear": do_nl, "inverse": do_nl & inverse}
    lut = None
    if cfg.nonlinear_prob > 0:
        lut = _bezier_lut(d.rand(B, 4), cfg.lut_size, inverse)
        info["lut"] = lut
    mapped_list = do_nl.tolist() if lut is not None else [False] * B
    plan = None
    if cfg.paint_prob > 0:
        plan = _paint_plan(B, H, W, cfg, d)
        info.update({k: v for k, v in plan.items() if k != "boxes"})
        if cpu:
            plan["box_lists"] = [t.tolist() for t in plan["boxes"]]
            plan["outpaint_list"] = plan["outpaint"].tolist()
        if return_info:
            info["noise_mask"] = _paint_mask(plan, H, W) > 0.5

    # ---- pixels, a chunk at a time
    target = torch.empty_like(x) if any(flips) else x
    img = target[:, 0]                                          # [B, H, W] view
    corrupted = torch.empty_like(img)
    paint = _paint_by_boxes if cpu else _paint_by_mask
    for a in range(0, B, chunk):
        b = min(B, a + chunk)
        if target is not x:                                     # flipped in the chunk, so it is still in cache
            for i in range(a, b):
                target[i].copy_(x[i].flip(_FLIP_DIMS[flips[i]]) if flips[i] else x[i])
        cur = img[a:b]                                          # read-only here: it is the target
        sh = [i - a for i in range(a, b) if layout_row[i] >= 0]
        if sh:                                                  # their layout rows are consecutive
            rows = slice(layout_row[a + sh[0]], layout_row[a + sh[0]] + len(sh))
            if len(sh) == b - a:
                cur = _shuffle_values(cur, layout, rows)
            else:
                pos = torch.tensor(sh, device=x.device)
                cur = cur.clone().index_copy_(0, pos, _shuffle_values(cur.index_select(0, pos), layout, rows))
        n_nl = sum(mapped_list[a:b])
        if n_nl:
            mapped = _apply_lut(cur, lut[a:b])
            if n_nl < b - a:                                    # the few unmapped samples: copied back
                keep = torch.tensor([j for j in range(b - a) if not mapped_list[a + j]], device=x.device)
                mapped.index_copy_(0, keep, cur.index_select(0, keep))
            cur = mapped
        if plan is None:
            corrupted[a:b] = cur
        else:
            d.noise(b - a, H, W, out=corrupted[a:b])             # drawn per sample: the same whatever the chunk
            paint(cur, corrupted[a:b], plan, a)

    corrupted = corrupted.unsqueeze(1)
    if return_info:
        return corrupted, target, info
    return corrupted, target


class GenesisTransform(torch.nn.Module):
    """Module wrapper: holds the config and, when seeded, one generator per device for repeatable runs."""

    def __init__(self, cfg: GenesisConfig | Mapping[str, Any] | None = None, seed: int | None = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, GenesisConfig) else GenesisConfig.from_dict(cfg)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        return genesis_batch(x, self.cfg, generator if generator is not None else self.generator_for(x.device))
