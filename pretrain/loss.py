"""Restoration losses: 1 - SSIM (the paper's loss), 1 - MS-SSIM, and 1 - SSIM + w * L1.

Always computed in fp32: SSIM's variance terms (E[x^2] - E[x]^2) lose all precision in bf16.
"""
from __future__ import annotations

import torch
from torch import nn

from runkit.errors import UserError

LOSSES = ("ssim", "ms-ssim", "ssim+l1")
WIN_SIZE = 11


def ms_ssim_min_size(win_size: int = WIN_SIZE) -> int:
    """pytorch_msssim downsamples 4 times, so the smaller side must exceed (win_size - 1) * 2**4."""
    return (win_size - 1) * 2 ** 4 + 1


class RestorationLoss(nn.Module):
    def __init__(self, kind: str = "ssim", l1_weight: float = 0.1, image_size: int | None = None):
        super().__init__()
        if kind not in LOSSES:
            raise UserError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
        if kind == "ms-ssim" and image_size is not None and image_size < ms_ssim_min_size():
            raise UserError(f"loss ms-ssim needs images of at least {ms_ssim_min_size()} px with window "
                            f"{WIN_SIZE}; got {image_size} (use --loss ssim or a larger --image-size)")
        self.kind = kind
        self.l1_weight = float(l1_weight)

    def forward(self, restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from pytorch_msssim import ms_ssim, ssim

        x = restored.float()
        y = target.float()
        if self.kind == "ms-ssim":
            if min(x.shape[-2:]) < ms_ssim_min_size():
                raise UserError(f"loss ms-ssim needs images of at least {ms_ssim_min_size()} px, "
                                f"got {tuple(x.shape[-2:])}")
            return 1.0 - ms_ssim(x, y, data_range=1.0, win_size=WIN_SIZE, size_average=True)
        loss = 1.0 - ssim(x, y, data_range=1.0, win_size=WIN_SIZE, size_average=True)
        if self.kind == "ssim+l1":
            loss = loss + self.l1_weight * (x - y).abs().mean()
        return loss


def ssim_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair, shape [B], for validation sums across ranks."""
    from pytorch_msssim import ssim

    return ssim(x.float(), y.float(), data_range=1.0, win_size=WIN_SIZE, size_average=False)


def psnr_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each pair with data range 1; capped at 100 dB for identical images."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)
