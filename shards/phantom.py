"""Frontal chest X-ray phantoms whose labels are true by construction.

Everything is drawn as a density map from implicit shapes evaluated on a precomputed coordinate
grid (no per-pixel Python loops), then turned into an 8-bit radiograph with random exposure,
contrast and film noise. Smooth random textures are `B @ G @ B.T` products of a small Gaussian
basis, which costs far less than blurring full-size noise.

Conventions: image column 0 is the patient's right, as on a real PA film, so `lung_right` is on
the image's left and the heart bulges to the image's right. Masks are in image pixels.
Severity follows Cohen et al.: geographic extent per lung 0-4 from the fraction of that lung
covered by lesion (0, <25, 25-50, 50-75, >75 %), opacity per lung 0-3 from lesion density.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

SIDES = ("right", "left")            # patient sides; "right" is drawn on the image's left
_SIGN = {"right": -1.0, "left": 1.0}  # sign of the body x coordinate of each lung
AIR = 0.44                             # density a fully aerated lung removes
OPACITY_THRESHOLDS = (0.40, 0.65)      # lesion density -> opacity 1 below the first, 2 below the second, else 3
HALF_RES_FROM = 256                    # sizes from here up are drawn at half resolution, then upsampled
DENSITY_BANDS = {1: (0.24, 0.36), 2: (0.46, 0.60), 3: (0.72, 0.92)}  # sampled well inside each level


@dataclass
class Phantom:
    image: np.ndarray                           # uint8 HxW
    masks: dict[str, np.ndarray]                # boolean HxW: lung_left, lung_right, lesion, heart
    params: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- severity
def geographic_score(fraction: float) -> int:
    """Cohen et al. extent per lung: 0 none, 1 <25 %, 2 25-50 %, 3 50-75 %, 4 >75 %."""
    if fraction <= 0.0:
        return 0
    return 1 + int(fraction >= 0.25) + int(fraction >= 0.50) + int(fraction >= 0.75)


def opacity_score(density: float, involved: bool) -> int:
    """Opacity per lung: 0 none, 1 faint ground glass, 2 moderate, 3 dense consolidation."""
    if not involved or density <= 0.0:
        return 0
    return 1 + int(density >= OPACITY_THRESHOLDS[0]) + int(density >= OPACITY_THRESHOLDS[1])


def severity_from_masks(lung_left, lung_right, lesion, density_left: float, density_right: float) -> dict:
    """Severity recomputed from saved masks and per-lung lesion densities (the rendering params).

    Returns per-lung fractions and scores plus the summed `geographic_mean` (0-8) and
    `opacity_mean` (0-6) written to covid-severity-scores.csv.
    """
    lesion = np.asarray(lesion, dtype=bool)
    out: dict[str, Any] = {}
    geo = opa = 0
    for side, lung, dens in (("left", lung_left, density_left), ("right", lung_right, density_right)):
        lung = np.asarray(lung, dtype=bool)
        n = int(lung.sum())
        hit = int(np.count_nonzero(lesion & lung))
        frac = hit / n if n else 0.0
        g = geographic_score(frac)
        o = opacity_score(float(dens), hit > 0)
        out[f"fraction_{side}"] = frac
        out[f"geographic_{side}"] = g
        out[f"opacity_{side}"] = o
        geo += g
        opa += o
    out["geographic_mean"] = float(geo)
    out["opacity_mean"] = float(opa)
    return out


# ----------------------------------------------------------------------------- cached grids
@lru_cache(maxsize=16)
def _axis(size: int) -> np.ndarray:
    return ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0)


@lru_cache(maxsize=32)
def _basis(size: int, k: int) -> np.ndarray:
    """S x k Gaussian bumps, rows normalised so `B @ G @ B.T` with G ~ N(0,1) has unit variance."""
    t = _axis(size).astype(np.float64)
    centers = np.linspace(-1.2, 1.2, k)
    sigma = (centers[1] - centers[0]) * 0.85
    b = np.exp(-0.5 * ((t[:, None] - centers[None, :]) / sigma) ** 2)
    b /= np.sqrt((b ** 2).sum(axis=1, keepdims=True))
    return b.astype(np.float32)


def smooth_field(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    """A smooth random field with about k/2 blobs across, zero mean and unit variance per pixel."""
    b = _basis(size, k)
    g = rng.standard_normal((k, k), dtype=np.float32)
    return b @ g @ b.T


@lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """Fixed film grain, 2S x 2S; each image takes a random crop, so grain costs one add."""
    rng = np.random.default_rng(20200601 + size)
    return rng.standard_normal((2 * size, 2 * size), dtype=np.float32)


def _ramp(signed: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator of a region given an (approximate) signed distance, negative inside."""
    return np.clip(0.5 - signed * (1.0 / width), 0.0, 1.0)


# ----------------------------------------------------------------------------- anatomy
def sample_anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Per-patient body habitus; follow-up images of one patient share it."""
    u = rng.uniform
    return {
        "body_width": round(u(0.80, 0.95), 4),
        "lung_width": round(u(0.25, 0.30), 4),
        "lung_height": round(u(0.62, 0.72), 4),
        "lung_gap": round(u(0.34, 0.39), 4),
        "dome_right": round(u(0.36, 0.46), 4),
        "dome_left": round(u(0.42, 0.52), 4),
        "heart_width": round(u(0.26, 0.30), 4),
        "heart_height": round(u(0.18, 0.22), 4),
        "heart_shift": round(u(0.07, 0.12), 4),
        "rib_count": round(u(8.5, 10.0), 4),
        "rib_curve": round(u(0.35, 0.55), 4),
        "clavicle_height": round(u(-0.74, -0.64), 4),
        "gastric_bubble": bool(u() < 0.6),
    }


def sample_acquisition(rng: np.random.Generator, view: str) -> dict[str, float]:
    """Per-image exposure, positioning and noise."""
    u = rng.uniform
    return {
        "rotation_deg": round(u(-4.0, 4.0), 3),
        "scale": round(u(0.93, 1.05), 4),
        "shift_x": round(u(-0.04, 0.04), 4),
        "shift_y": round(u(-0.03, 0.05), 4),
        "level": round(u(0.0, 0.08), 4),
        "contrast": round(u(1.05, 1.3), 4),
        "curve": round(u(-0.35, 0.35), 4),
        "noise": round(u(0.015, 0.04), 4),
        "heel": round(u(-0.06, 0.06), 4),
        "inspiration": round(u(0.97, 1.03) if view == "PA" else u(0.90, 0.98), 4),
        "magnification": 1.0 if view == "PA" else round(u(1.05, 1.12), 4),
    }


# ----------------------------------------------------------------------------- renderer
class _Canvas:
    """Body coordinates, anatomy and per-lung working windows of one image.

    Lung-level work runs on each lung's bounding window (about a quarter of the image), which is
    what keeps the renderer near 200 images/s at 256 px.
    """

    def __init__(self, size: int, anat: dict, acq: dict, heart_scale: float):
        self.size = size
        ax = _axis(size)
        th = np.deg2rad(acq["rotation_deg"])
        c, s = np.cos(th) / acq["scale"], np.sin(th) / acq["scale"]
        self._affine = (c, s, acq["shift_x"], acq["shift_y"])
        u, v = ax[None, :], ax[:, None]
        self.X = np.float32(c) * u + (np.float32(s) * v - np.float32(acq["shift_x"]))
        self.Y = np.float32(-s) * u + (np.float32(c) * v - np.float32(acq["shift_y"]))
        self.edge = max(0.012, 2.4 / (size * acq["scale"]))   # soft edge, at least ~1 px
        insp, mag = acq["inspiration"], acq["magnification"]

        hw = anat["heart_width"] * heart_scale * mag
        hh = anat["heart_height"] * (0.5 + 0.5 * heart_scale) * mag
        self.heart_geom = (anat["heart_shift"], 0.40 / insp, hw, hh)

        lw, lh = anat["lung_width"], anat["lung_height"] * insp
        self.sl: dict[str, tuple] = {}
        self.lung: dict[str, np.ndarray] = {}
        self.lung_soft: dict[str, np.ndarray] = {}
        self.air: dict[str, np.ndarray] = {}
        self.lat: dict[str, np.ndarray] = {}
        self.low: dict[str, np.ndarray] = {}
        self.geom: dict[str, tuple] = {}
        for side in SIDES:
            sg = _SIGN[side]
            cx, cy = sg * anat["lung_gap"], 0.02 + (lh - 0.67) * 0.3
            dome = anat["dome_" + side] * insp + (1 - insp) * 0.2
            bottom = min(cy + lh, dome + 1.6 * (lw + 0.05) ** 2)
            sl = self.window(cx - lw - 0.05, cx + lw + 0.05, cy - lh - 0.05, bottom + 0.05)
            X, Y = self.X[sl], self.Y[sl]
            e = ((X - cx) * (1.0 / lw)) ** 2 + ((Y - cy) * (1.0 / lh)) ** 2
            sd = (np.sqrt(e) - 1.0) * lw
            np.maximum(sd, Y - (dome + 1.6 * (X - (cx + sg * 0.02)) ** 2), out=sd)
            np.maximum(sd, (0.085 + 0.03 * (Y > 0.0)) - sg * X, out=sd)
            heart_sd = self.heart_sd(X, Y)
            soft = _ramp(sd, self.edge) * _ramp(-heart_sd, self.edge)
            self.sl[side] = sl
            self.lung[side] = (sd < 0) & (heart_sd >= 0)
            self.lung_soft[side] = soft
            self.air[side] = np.sqrt(np.clip(1.0 - e, 0.1, 1.0)) * soft
            self.lat[side] = (X - cx) * (sg / lw)                          # -1 medial .. +1 lateral
            self.low[side] = (Y - (cy - lh)) * (1.0 / (dome - (cy - lh)))  # 0 apex .. 1 dome
            self.geom[side] = (cx, cy, lw, lh, dome)

    def heart_sd(self, X, Y):
        hx, hy, hw, hh = self.heart_geom
        return (np.sqrt(((X - hx) * (1.0 / hw)) ** 2 + ((Y - hy) * (1.0 / hh)) ** 2) - 1.0) * hh

    def window(self, x0, x1, y0, y1) -> tuple[slice, slice]:
        """Pixel window covering the body-coordinate box [x0,x1] x [y0,y1] under this image's pose."""
        c, s, sx, sy = self._affine
        det = c * c + s * s
        bx = np.array([x0, x1, x0, x1]) + sx
        by = np.array([y0, y0, y1, y1]) + sy
        u = (c * bx - s * by) / det
        v = (s * bx + c * by) / det
        n = self.size
        to_px = lambda a: (a + 1.0) * n / 2.0
        c0, c1 = int(np.clip(np.floor(to_px(u.min())) - 1, 0, n)), int(np.clip(np.ceil(to_px(u.max())) + 1, 0, n))
        r0, r1 = int(np.clip(np.floor(to_px(v.min())) - 1, 0, n)), int(np.clip(np.ceil(to_px(v.max())) + 1, 0, n))
        return slice(r0, max(r1, r0 + 1)), slice(c0, max(c1, c0 + 1))

    def field(self, rng, k: int, sl) -> np.ndarray:
        """`smooth_field` evaluated on a window only."""
        b = _basis(self.size, k)
        g = rng.standard_normal((k, k), dtype=np.float32)
        return b[sl[0]] @ (g @ b[sl[1]].T)


def _pick_threshold(score: np.ndarray, region: np.ndarray, fraction: float, stride: int) -> float:
    """Score threshold whose upper set covers about `fraction` of `region` (on a strided subsample)."""
    vals = score[::stride, ::stride][region[::stride, ::stride]]
    if vals.size == 0:
        vals = score[region]
    n = vals.size
    if n == 0:
        return np.inf
    k = int(np.clip(round(fraction * n), 1, n))
    return float(np.partition(vals, n - k)[n - k])


def _lesion_from_score(cv: _Canvas, side: str, score: np.ndarray, fraction: float, softness: float):
    """Hard mask covering ~`fraction` of the lung, and a soft fill fading over `softness` score units."""
    region = cv.lung[side]
    t = _pick_threshold(score, region, fraction, max(1, cv.size // 128))
    hard = region & (score >= t)
    if not hard.any():                                   # always at least the top-scoring pixel
        hard = region & (score >= score[region].max())
    soft = np.clip((score - t) * (1.0 / softness) + 0.5, 0.0, 1.0) * cv.lung_soft[side]
    return hard, soft


def _paint_ggo(cv, rng, side, les):
    """COVID-19 pattern: peripheral, lower-zone, patchy ground glass."""
    sl = cv.sl[side]
    score = 0.9 * cv.lat[side] + 2.0 * cv.low[side] + 0.25 * cv.field(rng, 14, sl)
    hard, soft = _lesion_from_score(cv, side, score, les["fraction"], 0.35)
    tex = 0.75 + 0.25 * cv.field(rng, 22, sl)
    return hard, soft * tex * np.float32(les["density"])


def _paint_lobar(cv, rng, side, les):
    """Lobar consolidation: dense, sharply bounded by a fissure-like line, with air bronchograms."""
    sl = cv.sl[side]
    X, Y = cv.X[sl], cv.Y[sl]
    cx, cy, _lw, lh, dome = cv.geom[side]
    if les["lobe"] == "upper":
        score = (cy - 0.1 * lh) - Y - 0.1 * cv.lat[side]
    elif les["lobe"] == "middle":
        score = -np.abs(Y - (0.55 * dome + 0.45 * cy)) - 0.12 * cv.lat[side]
    else:
        score = Y + (0.25 * _SIGN[side]) * (X - cx)
    score += 0.05 * cv.field(rng, 12, sl)
    hard, soft = _lesion_from_score(cv, side, score, les["fraction"], 0.03)
    bronch = np.clip(1.0 - np.abs(cv.field(rng, 16, sl)) * 8.0, 0.0, 1.0)
    return hard, soft * (np.float32(les["density"]) * (1.0 - 0.3 * bronch))


def _paint_patchy(cv, rng, side, les):
    """Infiltration: scattered ill-defined patches anywhere in the lung."""
    score = cv.field(rng, 14, cv.sl[side])
    hard, soft = _lesion_from_score(cv, side, score, les["fraction"], 0.6)
    return hard, soft * np.float32(les["density"])


def _paint_perihilar(cv, rng, side, les):
    """Edema: bat-wing haze around the hilum."""
    sl = cv.sl[side]
    _cx, _cy, _lw, lh, _dome = cv.geom[side]
    d = (cv.lat[side] + 0.7) ** 2 + ((cv.Y[sl] - 0.05) * (1.0 / lh)) ** 2 * 2.0
    score = 0.25 * cv.field(rng, 12, sl) - d
    hard, soft = _lesion_from_score(cv, side, score, les["fraction"], 0.4)
    return hard, soft * np.float32(les["density"])


def _paint_patch(cv, rng, side, les):
    """Consolidation: a dense focal patch around a random point of the lung."""
    sl = cv.sl[side]
    X, Y = cv.X[sl], cv.Y[sl]
    ys, xs = np.nonzero(cv.lung[side])
    i = rng.integers(len(ys))
    x0, y0 = X[ys[i], xs[i]], Y[ys[i], xs[i]]
    score = 0.4 * cv.field(rng, 14, sl) - ((X - x0) ** 2 + (Y - y0) ** 2) * 20.0
    hard, soft = _lesion_from_score(cv, side, score, les["fraction"], 0.4)
    return hard, soft * np.float32(les["density"])


def _paint_blobs(cv, rng, side, les):
    """Mass / nodules: round opacities whose discs lie inside the lung."""
    lung = cv.lung[side]
    hard = np.zeros_like(lung)
    soft = np.zeros(lung.shape, np.float32)
    ys, xs = np.nonzero(lung)
    h, w = lung.shape
    for r in les["radii"]:
        rp = max(1.5, r * cv.size / 2.0)                  # radius in pixels
        for _ in range(20):                                # find a centre whose disc stays in the lung
            i = rng.integers(len(ys))
            y0, x0 = int(ys[i]), int(xs[i])
            y1, y2 = max(0, int(y0 - rp - 2)), min(h, int(y0 + rp + 3))
            x1, x2 = max(0, int(x0 - rp - 2)), min(w, int(x0 + rp + 3))
            yy = np.arange(y1, y2, dtype=np.float32)[:, None] - y0
            xx = np.arange(x1, x2, dtype=np.float32)[None, :] - x0
            d = np.sqrt(yy * yy + xx * xx) - rp
            inside = d < 0
            if lung[y1:y2, x1:x2][inside].all():
                break
        hard[y1:y2, x1:x2] |= inside & lung[y1:y2, x1:x2]
        soft[y1:y2, x1:x2] = np.maximum(soft[y1:y2, x1:x2], np.clip(0.5 - d / 1.2, 0, 1) * les["density"])
    return hard, soft


def _paint_effusion(cv, rng, side, les):
    """Pleural effusion: basal fluid with a meniscus that climbs laterally, blunting the angle."""
    lh = cv.geom[side][3]
    score = cv.Y[cv.sl[side]] + (0.22 * lh) * np.clip(cv.lat[side], 0.0, None)
    hard, soft = _lesion_from_score(cv, side, score, les["fraction"], 0.012)
    return hard, soft * np.float32(les["density"])


def _paint_atelectasis(cv, rng, side, les):
    """Plate atelectasis: an oblique linear band in the lower zone."""
    sl = cv.sl[side]
    cx, _cy, _lw, _lh, dome = cv.geom[side]
    y0 = dome - rng.uniform(0.12, 0.25)
    slope = rng.uniform(-0.25, 0.25)
    score = -np.abs(cv.Y[sl] - (y0 + slope * (cv.X[sl] - cx))) - 0.15 * np.abs(cv.lat[side] - 0.1)
    hard, soft = _lesion_from_score(cv, side, score, les["fraction"], 0.01)
    return hard, soft * np.float32(les["density"])


def _paint_pneumothorax(cv, rng, side, les):
    """Pneumothorax: apical-lateral rim of free air without lung markings, edged by a pleural line."""
    _cx, cy, _lw, lh, _dome = cv.geom[side]
    r = np.sqrt((cv.lat[side] * 0.9) ** 2 + ((cv.Y[cv.sl[side]] - (cy + 0.25 * lh)) * (1.0 / lh)) ** 2)
    hard, soft = _lesion_from_score(cv, side, r, les["fraction"], 0.02)
    line = np.clip(1.0 - np.abs(r - r[hard].min()) * (1.0 / 0.025), 0.0, 1.0) * cv.lung_soft[side]
    return hard, soft, line


_PAINTERS = {"ggo": _paint_ggo, "lobar": _paint_lobar, "patchy": _paint_patchy, "perihilar": _paint_perihilar,
             "patch": _paint_patch, "blobs": _paint_blobs, "effusion": _paint_effusion,
             "atelectasis": _paint_atelectasis, "pneumothorax": _paint_pneumothorax}
LESION_KINDS = tuple(_PAINTERS)


def _ribs(anat: dict, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Posterior ribs curving down laterally plus fainter anterior ribs rising laterally, in the cage."""
    ax_ = np.abs(X)
    cage = _ramp((np.sqrt((X * (1.0 / 0.8)) ** 2 + ((Y - 0.02) * (1.0 / 0.85)) ** 2) - 1.0) * 0.8, 0.04)
    cage *= np.clip((0.6 - Y) * 5.0, 0.0, 1.0) * np.clip(ax_ * 12.0 - 0.8, 0.0, 1.0)
    yp = np.sqrt(np.clip((Y - anat["rib_curve"] * X * X + 0.95) * 0.55, 0.0, None))
    ribs = np.clip(np.cos(yp * np.float32(2 * np.pi * anat["rib_count"])) * 2.0 - 0.5, 0.0, 1.0)
    ant = np.cos((Y + 0.35 * ax_) * np.float32(2 * np.pi * 5.0))
    ribs += np.clip(ant * 2.5 - 1.9, 0.0, 0.5) * np.clip(ax_ * 3.0 - 0.4, 0.0, 1.0)
    return ribs * cage


def render(size: int, anatomy: dict, lesions: list[dict], view: str, rng: np.random.Generator,
           cardiomegaly: float = 1.0) -> Phantom:
    """Draw one radiograph. `lesions`: dicts with `kind` (LESION_KINDS), `side` and its parameters.

    From 256 px up, anatomy and masks are drawn at half resolution and upsampled (bilinear for
    the image, nearest for the masks, so mask fractions are unchanged); film grain is full size.
    """
    if size < 16:
        raise ValueError(f"phantom size {size} is too small (minimum 16)")
    full = size
    inner = size // 2 if size >= HALF_RES_FROM and size % 2 == 0 else size
    acq = sample_acquisition(rng, view)
    cv = _Canvas(inner, anatomy, acq, cardiomegaly)
    size = inner
    X, Y = cv.X, cv.Y

    fill = {s: np.zeros(cv.lung[s].shape, np.float32) for s in SIDES}   # fraction of lung air replaced
    calm = {s: np.ones(cv.lung[s].shape, np.float32) for s in SIDES}    # where lung markings survive
    lesion = np.zeros((size, size), bool)
    extra = np.zeros((size, size), np.float32)
    rendered = []
    for les in lesions:
        side, kind = les["side"], les["kind"]
        if kind not in _PAINTERS:
            raise ValueError(f"unknown lesion kind {kind!r}")
        sl = cv.sl[side]
        if kind == "pneumothorax":
            hard, soft, line = _paint_pneumothorax(cv, rng, side, les)
            calm[side] *= 1.0 - soft
            extra[sl] += 0.07 * line - 0.06 * soft
        else:
            hard, soft = _PAINTERS[kind](cv, rng, side, les)
            np.maximum(fill[side], soft, out=fill[side])
        lesion[sl] |= hard
        rendered.append({**les, "pixels": int(np.count_nonzero(hard))})

    # ---- density: soft tissue, minus lung air, plus bones
    bw = anatomy["body_width"]
    ax2 = (X * (1.0 / bw)) ** 2
    ay2 = ((Y - 0.3) * (1.0 / 1.3)) ** 2
    body = 1.0 - ax2 * ax2 - ay2 * ay2
    r_neck = int(np.clip((0.35 - acq["shift_y"]) / 2.0 * size, 1, size))   # rows above Y ~ -0.6
    np.maximum(body[:r_neck], 1.0 - (X[:r_neck] * (1.0 / 0.22)) ** 2, out=body[:r_neck])
    D = np.sqrt(np.clip(body, 0.0, 1.0)) * 0.55 + np.float32(0.3) * (body > 0)
    D += extra

    for side in SIDES:
        sl = cv.sl[side]
        aer = cv.air[side] * (1.0 - fill[side])
        marks = np.clip(1.0 - np.abs(cv.field(rng, 26, sl)) * 3.0, 0.0, 1.0)
        hil = np.clip(0.75 - 0.45 * cv.lat[side], 0.2, 1.0)
        D[sl] -= AIR * aer - (0.05 * hil) * marks * calm[side] * aer

    hx, hy, hw, hh = cv.heart_geom
    spine_sl = cv.window(-0.09, 0.09, -1.2, 1.2)
    Xs, Ys = X[spine_sl], Y[spine_sl]
    vert = 0.7 + 0.3 * np.cos(Ys * np.float32(2 * np.pi * 7.5))
    D[spine_sl] += (0.035 * vert) * _ramp(np.abs(Xs) - 0.065, cv.edge)
    ksl = cv.window(0.03, 0.21, -0.36, -0.2)
    D[ksl] += 0.04 * _ramp(np.sqrt((X[ksl] - 0.12) ** 2 + ((Y[ksl] + 0.28) * 1.3) ** 2) - 0.07, cv.edge)

    csl = cv.window(-0.85, 0.85, -1.0, 0.62)
    D[csl] += 0.09 * _ribs(anatomy, X[csl], Y[csl])

    ch = anatomy["clavicle_height"]
    for sg in (-1.0, 1.0):
        sl = cv.window(min(sg * 0.05, sg * 0.65), max(sg * 0.05, sg * 0.65), ch - 0.2, ch + 0.1)
        Xc, Yc = X[sl], Y[sl]
        t = np.clip((sg * Xc - 0.07) * (1.0 / 0.5), 0.0, 1.0)
        yc = ch - 0.12 * t + 0.05 * np.sin(np.float32(np.pi) * t)
        clav = _ramp(np.abs(Yc - yc) - 0.026, cv.edge) * np.clip((0.62 - sg * Xc) * 20.0, 0.0, 1.0)
        clav *= np.clip((sg * Xc - 0.06) * 20.0, 0.0, 1.0)
        D[sl] += 0.10 * clav
    if anatomy["gastric_bubble"]:
        dl = cv.geom["left"][4]
        sl = cv.window(0.18, 0.42, dl + 0.08, dl + 0.2)
        D[sl] -= 0.1 * _ramp(np.sqrt(((X[sl] - 0.3) * 1.6) ** 2 + ((Y[sl] - dl - 0.14) * 2.5) ** 2) - 0.1, cv.edge)

    # ---- exposure: window and contrast curve, heel effect, film grain
    img = (D - np.float32(acq["level"])) * np.float32(acq["contrast"])
    np.clip(img, 0.0, 1.0, out=img)
    img += np.float32(acq["curve"]) * img * (1.0 - img)
    img *= (1.0 + acq["heel"] * _axis(size))[:, None]
    if inner != full:
        img = np.array(Image.fromarray(img, "F").resize((full, full), Image.BILINEAR))
    size = full
    bank = _noise_bank(size)
    oy, ox = (int(o) for o in rng.integers(0, size, size=2))
    img += np.float32(acq["noise"]) * bank[oy:oy + size, ox:ox + size]
    img *= 255.0
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    out = img.astype(np.uint8)

    lungs = {}
    size = inner
    for side in SIDES:
        m = np.zeros((size, size), bool)
        m[cv.sl[side]] = cv.lung[side]
        lungs[side] = m
    heart = np.zeros((size, size), bool)
    hsl = cv.window(hx - hw, hx + hw, hy - hh, hy + hh)
    heart[hsl] = cv.heart_sd(X[hsl], Y[hsl]) < 0
    masks = {"lung_left": lungs["left"], "lung_right": lungs["right"], "lesion": lesion, "heart": heart}
    if inner != full:
        f = full // inner
        masks = {k: np.repeat(np.repeat(m, f, axis=0), f, axis=1) for k, m in masks.items()}
    return Phantom(out, masks, {"view": view, "acquisition": acq, "lesions": rendered,
                                "cardiomegaly": cardiomegaly})
