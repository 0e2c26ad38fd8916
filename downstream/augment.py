"""Batched train-time augmentation on [B,1,H,W] images in [0,1]: flips, a small affine, brightness/contrast.

Done on tensors with one `affine_grid` per batch, on the batch's device (random draws stay on the CPU
generator, so a seed gives the same augmentation on CPU and GPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, *, gen: torch.Generator, hflip: bool = True, vflip: bool = False,
            affine: bool = True, rotate_deg: float = 10.0, scale: float = 0.1, translate: float = 0.05,
            brightness_contrast: bool = True, brightness: float = 0.1, contrast: float = 0.2) -> torch.Tensor:
    b = x.shape[0]

    def u(lo, hi):
        return torch.rand(b, generator=gen) * (hi - lo) + lo

    if hflip:
        m = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(m.view(b, 1, 1, 1), x.flip(3), x)
    if vflip:
        m = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(m.view(b, 1, 1, 1), x.flip(2), x)
    if affine:
        ang = u(-rotate_deg, rotate_deg) * math.pi / 180.0
        s = u(1 - scale, 1 + scale)
        tx, ty = u(-translate, translate) * 2, u(-translate, translate) * 2
        cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if brightness_contrast:
        c = u(1 - contrast, 1 + contrast).view(b, 1, 1, 1).to(x.device)
        br = u(-brightness, brightness).view(b, 1, 1, 1).to(x.device)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c + mean + br).clamp(0, 1)
    return x
