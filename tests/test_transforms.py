"""The batched Models Genesis transforms against the plain per-sample numpy port of the reference.

The port lives in benchmarks/genesis_reference.py (it is also the speed baseline of bench_transforms.py), so
this file puts benchmarks/ on sys.path. Each transform is run alone at probability 1 on a few hundred small
images in both implementations and their statistics must agree.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.transforms import GenesisConfig, GenesisTransform, _bezier_lut, genesis_batch
from runkit.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import genesis_reference as ref

N, S = 300, 64                     # samples, image side
OFF = {"flip_prob": 0.0, "local_shuffle_prob": 0.0, "nonlinear_prob": 0.0, "paint_prob": 0.0}


def _images(n=N, side=S, seed=0) -> torch.Tensor:
    """Distinct random values in (0, 1): any moved or replaced pixel changes value."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g).mul_(0.98).add_(0.01)


def _both(cfg: GenesisConfig, x: torch.Tensor, seed=1, n_times=20_000):
    g = torch.Generator().manual_seed(seed)
    c, t = genesis_batch(x, cfg, g)
    rc, rt = ref.genesis_batch_numpy(x.double().numpy(), cfg, seed=seed, n_times=n_times)
    return c, t, torch.from_numpy(rc).float(), torch.from_numpy(rt).float()


def test_shapes_dtype_range_and_determinism():
    x = _images(16)
    cfg = GenesisConfig()
    for dtype in (torch.float32, torch.float64):
        c1, t1 = genesis_batch(x.to(dtype), cfg, torch.Generator().manual_seed(3))
        c2, t2 = genesis_batch(x.to(dtype), cfg, torch.Generator().manual_seed(3))
        assert c1.shape == t1.shape == x.shape and c1.dtype == t1.dtype == dtype
        assert c1.device == x.device
        assert torch.equal(c1, c2) and torch.equal(t1, t2)
        assert 0.0 <= c1.min() and c1.max() <= 1.0
    c3, _ = genesis_batch(x, cfg, torch.Generator().manual_seed(4))
    assert not torch.equal(c3, c1.float())
    mod = GenesisTransform({"paint_prob": 0.5}, seed=7)
    a = mod(x)[0]
    assert torch.equal(GenesisTransform({"paint_prob": 0.5}, seed=7)(x)[0], a)


def test_chunk_size_and_painting_kernel_do_not_change_the_result(monkeypatch):
    """On CPU the pixels are made a few samples at a time and painted by rectangle copies; on a GPU in one
    chunk with one mask. Every random draw is made first, so all of these give the same bits."""
    import pretrain.transforms as T

    x = _images(13)
    for cfg in (GenesisConfig(), GenesisConfig(inpaint_prob=0.5, local_shuffle_prob=0.7, nonlinear_prob=0.5)):
        want_c, want_t, info = genesis_batch(x, cfg, torch.Generator().manual_seed(5), chunk=13, return_info=True)
        assert 0 < int(info["shuffle"].sum()) < 13 and int(info["inpaint"].sum()) > 0  # mixed chunks occur
        for chunk in (1, 2, 5):
            c, t = genesis_batch(x, cfg, torch.Generator().manual_seed(5), chunk=chunk)
            assert torch.equal(c, want_c) and torch.equal(t, want_t), chunk
        with monkeypatch.context() as m:
            m.setattr(T, "_paint_by_boxes", T._paint_by_mask)
            c, _ = genesis_batch(x, cfg, torch.Generator().manual_seed(5), chunk=4)
        assert torch.equal(c, want_c)
        # outside the noise mask the image (shuffled and mapped) shows through, inside it is noise
        assert not torch.equal(c[info["noise_mask"][:, None]], want_t[info["noise_mask"][:, None]])
    with pytest.raises(ValueError, match="chunk"):
        genesis_batch(x, GenesisConfig(), chunk=0)


def test_all_off_is_identity_and_bad_input():
    x = _images(8)
    c, t = genesis_batch(x, GenesisConfig(**OFF), torch.Generator().manual_seed(0))
    assert torch.equal(c, x) and torch.equal(t, x)
    with pytest.raises(ValueError):
        genesis_batch(x[:, 0], GenesisConfig())
    with pytest.raises(UserError):
        genesis_batch(_images(2, side=12), GenesisConfig())


def test_config_from_dict():
    cfg = GenesisConfig.from_dict({"flip_prob": 0.1, "inpaint_frac": [0.2, 0.3]})
    assert cfg.flip_prob == 0.1 and cfg.inpaint_frac == (0.2, 0.3)
    assert GenesisConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="unknown"):
        GenesisConfig.from_dict({"flip_rate": 0.1})
    with pytest.raises(UserError, match="probability"):
        GenesisConfig.from_dict({"paint_prob": 1.5})
    # the reference's integer ranges
    assert cfg.block_range(64) == (1, 6)
    assert GenesisConfig().inpaint_range(64) == (10, 21)
    assert GenesisConfig().outpaint_range(64) == (64 - 36, 64 - 27)


def test_flip_frequency_matches_reference():
    cfg = GenesisConfig(**{**OFF, "flip_prob": 0.4})
    x = _images()
    c, t, rc, rt = _both(cfg, x)
    assert torch.equal(c, t) and torch.equal(rc, rt)          # flips apply to input and target
    # net flip != identity: 1 flip, or 2 on different axes, or 3 flips -> 0.24 + 0.048 + 0.064
    frac = (t != x).flatten(1).any(1).float().mean().item()
    rfrac = (rt != x).flatten(1).any(1).float().mean().item()
    assert abs(frac - 0.352) < 0.08 and abs(rfrac - 0.352) < 0.08
    # every output is one of the four flips of its input
    for i in range(0, N, 37):
        options = [x[i], x[i].flip(-1), x[i].flip(-2), x[i].flip(-1, -2)]
        assert any(torch.equal(t[i], o) for o in options)


def test_local_shuffle_statistics():
    cfg = GenesisConfig(**{**OFF, "local_shuffle_prob": 1.0})
    x = _images(200)
    c, t, rc, _ = _both(cfg, x)
    assert torch.equal(t, x)
    frac = (c != x).float().mean().item()
    rfrac = (rc != x).float().mean().item()
    assert 0.5 < rfrac < 0.95
    assert abs(frac - rfrac) < 0.06, (frac, rfrac)
    # border fall-off like the reference: the outer rows change less than the centre
    edge = (c != x)[..., :2, :].float().mean().item()
    redge = (rc != x)[..., :2, :].float().mean().item()
    assert edge < frac and abs(edge - redge) < 0.1
    # a permutation of each image, moving pixels only locally (< block side)
    assert torch.equal(c.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    side = S
    ramp = torch.arange(side * side, dtype=torch.float64).view(1, 1, side, side).expand(4, 1, side, side)
    out, _ = genesis_batch(ramp / (side * side), replace(cfg), torch.Generator().manual_seed(5))
    src = (out * side * side).round().long().view(4, -1)
    own = torch.arange(side * side)
    dmax = cfg.block_range(side)[1]
    assert ((src // side - own // side).abs() < dmax).all() and ((src % side - own % side).abs() < dmax).all()


def test_nonlinear_monotone_and_inverted():
    x = _images(200)
    # forced non-inverted: monotone non-decreasing per sample
    ramp = torch.linspace(0, 1, S * S, dtype=torch.float32).view(1, 1, S, S).expand(50, 1, S, S).contiguous()
    up, _ = genesis_batch(ramp, GenesisConfig(**{**OFF, "nonlinear_prob": 1.0, "inverse_prob": 0.0}),
                          torch.Generator().manual_seed(2))
    assert (up.flatten(1).diff(dim=1) >= 0).all()
    assert torch.allclose(up.flatten(1)[:, 0], torch.zeros(50), atol=1e-4)
    down, _ = genesis_batch(ramp, GenesisConfig(**{**OFF, "nonlinear_prob": 1.0, "inverse_prob": 1.0}),
                            torch.Generator().manual_seed(2))
    assert (down.flatten(1).diff(dim=1) <= 0).all()
    # fraction of increasing mappings ~0.5 in both implementations
    cfg = GenesisConfig(**{**OFF, "nonlinear_prob": 1.0})
    c, _, rc, _ = _both(cfg, x)

    def increasing(out):
        xc = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
        oc = out.flatten(1) - out.flatten(1).mean(1, keepdim=True)
        return ((xc * oc).sum(1) > 0).float().mean().item()

    assert abs(increasing(c) - 0.5) < 0.12 and abs(increasing(rc) - 0.5) < 0.12
    assert 0.0 <= c.min() and c.max() <= 1.0
    # mean absolute intensity change agrees with the reference
    assert abs((c - x).abs().mean().item() - (rc - x).abs().mean().item()) < 0.03


def test_bezier_lut_matches_reference_interp():
    rng = np.random.RandomState(0)
    v = np.linspace(0, 1, 501)
    for inverse in (False, True):
        pts = rng.rand(20, 4)
        lut = _bezier_lut(torch.from_numpy(pts).float(), 1024, torch.full((20,), inverse))
        grid = np.arange(1025) / 1024
        for k in range(20):
            x1, y1, x2, y2 = pts[k]
            xs, ys = ref.bezier_curve([[0, 0], [x1, y1], [x2, y2], [1, 1]], n_times=100_000)
            if inverse:
                xs = np.sort(xs)
            else:
                xs, ys = np.sort(xs), np.sort(ys)
            want = np.interp(v, xs, ys)
            got = np.interp(v, grid, lut[k].numpy())
            assert np.abs(got - want).mean() < 2e-3, (k, inverse)


def _bbox(mask: torch.Tensor):
    """Bounding box (y0, x0, h, w) of True pixels per sample of [B, H, W]."""
    rows, cols = mask.any(2), mask.any(1)
    out = []
    for r, c in zip(rows, cols):
        ry, cx = r.nonzero().squeeze(1), c.nonzero().squeeze(1)
        out.append((ry[0].item(), cx[0].item(), (ry[-1] - ry[0] + 1).item(), (cx[-1] - cx[0] + 1).item()))
    return np.array(out)


def test_painting_box_sizes_and_fractions():
    x = torch.full((N, 1, S, S), 0.3)      # off the 2^-15 noise grid: noise never equals it
    # one in-painting box: its bounding box is the box
    cfg = GenesisConfig(**{**OFF, "paint_prob": 1.0, "inpaint_prob": 1.0, "inpaint_max_boxes": 1,
                           "more_box_prob": 1.0})
    c, _, rc, _ = _both(cfg, x)
    lo, hi = cfg.inpaint_range(S)
    for out in (c, rc):
        b = _bbox(out[:, 0] != 0.3)
        assert b[:, 2:].min() >= lo and b[:, 2:].max() <= hi
        assert b[:, :2].min() >= 3 and (b[:, :2] + b[:, 2:]).max() <= S - 3
        assert abs(b[:, 2:].mean() - (lo + hi) / 2) < 1.0
    # one out-painting window: the unchanged region is the window
    cfg = GenesisConfig(**{**OFF, "paint_prob": 1.0, "inpaint_prob": 0.0, "outpaint_max_extra": 0})
    c, _, rc, _ = _both(cfg, x)
    lo, hi = cfg.outpaint_range(S)
    for out in (c, rc):
        b = _bbox(out[:, 0] == 0.3)
        assert b[:, 2:].min() >= lo and b[:, 2:].max() <= hi
        assert b[:, :2].min() >= 3 and (b[:, :2] + b[:, 2:]).max() <= S - 3
        assert abs(b[:, 2:].mean() - (lo + hi) / 2) < 1.0
    # reference defaults: the fraction of noise pixels agrees, for in- and out-painting
    for inpaint in (1.0, 0.0):
        cfg = GenesisConfig(**{**OFF, "paint_prob": 1.0, "inpaint_prob": inpaint})
        c, _, rc, _ = _both(cfg, x)
        f, rf = (c != 0.3).float().mean().item(), (rc != 0.3).float().mean().item()
        assert abs(f - rf) < 0.03, (inpaint, f, rf)
        vals = c[c != 0.3]
        assert 0.0 <= vals.min() and vals.max() < 1.0 and abs(vals.mean().item() - 0.5) < 0.01


def test_full_pipeline_changes_like_reference():
    x = _images(200, seed=3)
    c, t, rc, rt = _both(GenesisConfig(), x)
    f, rf = (c != t).float().mean().item(), (rc != rt).float().mean().item()
    assert abs(f - rf) < 0.06, (f, rf)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_device_and_determinism():
    x = _images(16).cuda()
    g1, g2 = (torch.Generator(device="cuda").manual_seed(0) for _ in range(2))
    c1, t1 = genesis_batch(x, GenesisConfig(), g1)
    c2, _ = genesis_batch(x, GenesisConfig(), g2)
    assert c1.is_cuda and t1.is_cuda and torch.equal(c1, c2)
    assert 0.0 <= c1.min() and c1.max() <= 1.0
    with pytest.raises(ValueError, match="generator"):
        genesis_batch(x, GenesisConfig(), torch.Generator().manual_seed(0))
