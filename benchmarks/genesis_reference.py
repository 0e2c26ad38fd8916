"""Plain per-sample numpy port of the Models Genesis transforms (MrGiovanni/ModelsGenesis `pytorch/utils.py`), in 2D.

It is the correctness and speed baseline for the batched `pretrain.transforms`: tests compare the two
statistically and `bench_transforms.py` times them. It keeps the reference's algorithm on purpose, slow parts
included: the pure-Python loop over shuffle blocks and the 100,000-point Bezier curve per sample. Changes for
2D: arrays are [1, H, W] instead of [1, X, Y, Z]; flips pick among the two spatial axes (the 3D reference's
`random.choice([0, 1, 2])` includes the size-1 channel axis, a no-op flip); the block count is a parameter
(the reference's 10,000 is for a 64x64x32 cube). Randomness comes from an explicit `random.Random` and
`np.random.RandomState` instead of the global generators, so runs are repeatable.
"""
from __future__ import annotations

import random
from math import comb

import numpy as np


def bernstein_poly(i: int, n: int, t: np.ndarray) -> np.ndarray:
    """Bernstein polynomial with the reference's index order: point 0 gets t**n, so the curve runs P3 -> P0."""
    return comb(n, i) * (t ** (n - i)) * (1 - t) ** i


def bezier_curve(points, n_times: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    xp = np.array([p[0] for p in points])
    yp = np.array([p[1] for p in points])
    t = np.linspace(0.0, 1.0, n_times)
    poly = np.array([bernstein_poly(i, len(points) - 1, t) for i in range(len(points))])
    return xp @ poly, yp @ poly


def flip(x: np.ndarray, y: np.ndarray, prob: float, max_flips: int, py: random.Random):
    """Flip input and target together along a random spatial axis, up to `max_flips` times, each while rand < prob."""
    cnt = max_flips
    while py.random() < prob and cnt > 0:
        axis = py.choice([1, 2])
        x = np.flip(x, axis=axis)
        y = np.flip(y, axis=axis)
        cnt -= 1
    return x, y


def nonlinear_transformation(x: np.ndarray, prob: float, py: random.Random, inverse_prob: float = 0.5,
                             n_times: int = 100_000) -> np.ndarray:
    if py.random() >= prob:
        return x
    points = [[0, 0], [py.random(), py.random()], [py.random(), py.random()], [1, 1]]
    xvals, yvals = bezier_curve(points, n_times=n_times)
    if py.random() < inverse_prob:
        xvals = np.sort(xvals)  # yvals keep their falling order: a decreasing (inverted) mapping
    else:
        xvals, yvals = np.sort(xvals), np.sort(yvals)
    return np.interp(x, xvals, yvals)


def local_pixel_shuffling(x: np.ndarray, prob: float, n_blocks: int, py: random.Random,
                          nr: np.random.RandomState, max_side: tuple[int, int]) -> np.ndarray:
    """The reference loop: each block reads the ORIGINAL pixels, shuffles them and overwrites the output."""
    if py.random() >= prob:
        return x
    image_temp = x.copy()
    orig_image = x.copy()
    _, rows, cols = x.shape
    for _ in range(n_blocks):
        bx = py.randint(1, max_side[0])   # reference: randint(1, rows//10)
        by = py.randint(1, max_side[1])
        nx = py.randint(0, rows - bx)
        ny = py.randint(0, cols - by)
        window = orig_image[0, nx:nx + bx, ny:ny + by].flatten()
        nr.shuffle(window)
        image_temp[0, nx:nx + bx, ny:ny + by] = window.reshape((bx, by))
    return image_temp


def image_in_painting(x: np.ndarray, cfg, py: random.Random, nr: np.random.RandomState) -> np.ndarray:
    _, rows, cols = x.shape
    border = cfg.border
    cnt = cfg.inpaint_max_boxes
    while cnt > 0 and py.random() < cfg.more_box_prob:
        bx = py.randint(*cfg.inpaint_range(rows))   # reference: randint(rows//6, rows//3)
        by = py.randint(*cfg.inpaint_range(cols))
        nx = py.randint(border, rows - bx - border)
        ny = py.randint(border, cols - by - border)
        x[:, nx:nx + bx, ny:ny + by] = nr.rand(bx, by) * 1.0
        cnt -= 1
    return x


def image_out_painting(x: np.ndarray, cfg, py: random.Random, nr: np.random.RandomState) -> np.ndarray:
    _, rows, cols = x.shape
    border = cfg.border
    cut_r = [rows - v for v in cfg.outpaint_range(rows)][::-1]    # reference: (3*rows//7, 4*rows//7)
    cut_c = [cols - v for v in cfg.outpaint_range(cols)][::-1]
    image_temp = x.copy()
    x = nr.rand(*x.shape) * 1.0

    def restore_window():
        bx = rows - py.randint(*cut_r)
        by = cols - py.randint(*cut_c)
        nx = py.randint(border, rows - bx - border)
        ny = py.randint(border, cols - by - border)
        x[:, nx:nx + bx, ny:ny + by] = image_temp[:, nx:nx + bx, ny:ny + by]

    restore_window()
    cnt = cfg.outpaint_max_extra
    while cnt > 0 and py.random() < cfg.more_box_prob:
        restore_window()
        cnt -= 1
    return x


def genesis_sample(img: np.ndarray, cfg, n_blocks: int, py: random.Random, nr: np.random.RandomState,
                   n_times: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """One [1, H, W] image in [0, 1] -> (corrupted input, target), in the reference's order.

    `cfg` is a `pretrain.transforms.GenesisConfig` (only its probabilities and counts are read).
    """
    y = img.copy()
    x = img.copy()
    x, y = flip(x, y, cfg.flip_prob, cfg.max_flips, py)
    x = np.ascontiguousarray(x)
    max_side = (cfg.block_range(x.shape[1])[1], cfg.block_range(x.shape[2])[1])
    x = local_pixel_shuffling(x, cfg.local_shuffle_prob, n_blocks, py, nr, max_side)
    x = nonlinear_transformation(x, cfg.nonlinear_prob, py, cfg.inverse_prob, n_times)
    if py.random() < cfg.paint_prob:
        if py.random() < cfg.inpaint_prob:
            x = image_in_painting(x, cfg, py, nr)
        else:
            x = image_out_painting(x, cfg, py, nr)
    return x, np.ascontiguousarray(y)


def genesis_batch_numpy(batch: np.ndarray, cfg, seed: int = 0, n_times: int = 100_000):
    """[B, 1, H, W] -> (corrupted, target) by looping `genesis_sample` over the batch, as the reference does."""
    py = random.Random(seed)
    nr = np.random.RandomState(seed)
    h, w = batch.shape[-2:]
    n_blocks = cfg.blocks_for(h, w)
    xs, ys = [], []
    for img in batch:
        x, y = genesis_sample(img, cfg, n_blocks, py, nr, n_times)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys)
