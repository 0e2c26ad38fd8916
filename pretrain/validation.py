"""Restoration validation that a blur or a flat image cannot pass, and the collapse detector.

SSIM of the restoration against the original is reported beside three trivial answers, on the same
corrupted images:
- `identity`: the corrupted input itself;
- `blur`: the corrupted input, Gaussian-blurred (the best of sigma 1, 2 and 4 px; a blur removes the
  noise and keeps the low frequencies, and SSIM against a noisy input rewards it);
- `mean_image`: the mean training image, the same for every input (what a collapsed model outputs).
`val/ssim_margin` is the restoration's SSIM minus the best of the three: above 0 it restores better
than any of them.

Collapse: `spread` is the per-pixel standard deviation across a batch, averaged over pixels. A model
whose output no longer depends on its input has a restored spread near 0 while the originals' stays put;
`val/spread_ratio` is restored over original. An untrained U-Net outputs a near-constant 0.5 (ratio
about 0.001-0.003 at init), so a low ratio early on is not a collapse by itself (see `CollapseCheck`).
"""
from __future__ import annotations

import math

import torch

BLUR_SIGMAS = (1.0, 2.0, 4.0)
COLLAPSE_RATIO = 0.05   # restored spread below this fraction of the originals' is a collapse


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    k = 2 * math.ceil(3 * sigma) + 1
    k = min(k, (min(x.shape[-2:]) // 2) * 2 - 1)  # an odd kernel no larger than the image
    return gaussian_blur(x, [k, k], [sigma, sigma])


def batch_spread(x: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the standard deviation across the batch (0 for a batch of one)."""
    if x.shape[0] < 2:
        return x.new_zeros(())
    return x.float().std(dim=0, unbiased=False).mean()


class RestorationStats:
    """Sums over validation batches, on the device; `reduce` all-reduces them once and returns the metrics."""

    NAMES = ("ssim", "ssim_identity", *(f"ssim_blur_{s:g}" for s in BLUR_SIGMAS), "ssim_mean_image",
             "psnr", "psnr_identity", "spread_restored", "spread_original", "spread_batches", "count")

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)

    def add(self, restored: torch.Tensor, corrupted: torch.Tensor, target: torch.Tensor,
            mean_image: torch.Tensor | None) -> None:
        from pretrain.loss import psnr_per_sample, ssim_per_sample

        corrupted = corrupted.float()
        n = target.shape[0]
        ssim = [ssim_per_sample(restored, target), ssim_per_sample(corrupted, target)]
        ssim += [ssim_per_sample(blur(corrupted, s).clamp(0, 1), target) for s in BLUR_SIGMAS]
        if mean_image is not None:
            ssim.append(ssim_per_sample(mean_image.expand_as(target), target))
        else:
            ssim.append(torch.full_like(ssim[0], float("nan")))
        psnr = [psnr_per_sample(restored, target), psnr_per_sample(corrupted, target)]
        two = float(n >= 2)
        row = [v.double().sum() for v in ssim + psnr]
        row += [batch_spread(restored).double() * two, batch_spread(target).double() * two,
                self.sums.new_tensor(two), self.sums.new_tensor(float(n))]
        self.sums += torch.stack(row)

    def reduce(self, all_sum) -> dict:
        total = dict(zip(self.NAMES, all_sum(self.sums.tolist(), self.sums.device)))
        n = max(total["count"], 1.0)
        m = {f"val/{k}": total[k] / n for k in self.NAMES[:-4]}
        blurs = {s: m.pop(f"val/ssim_blur_{s:g}") for s in BLUR_SIGMAS}
        best_sigma = max(blurs, key=blurs.get)
        m["val/ssim_blur"], m["val/blur_sigma"] = blurs[best_sigma], best_sigma
        b = max(total["spread_batches"], 1.0)
        spread_r, spread_o = total["spread_restored"] / b, total["spread_original"] / b
        m["val/spread_restored"], m["val/spread_original"] = spread_r, spread_o
        m["val/spread_ratio"] = spread_r / spread_o if spread_o > 0 else float("nan")
        baselines = [m["val/ssim_identity"], m["val/ssim_blur"], m["val/ssim_mean_image"]]
        m["val/ssim_margin"] = m["val/ssim"] - max(v for v in baselines if math.isfinite(v))
        m["val/count"] = int(total["count"])
        return m


class CollapseCheck:
    """Warns once, with the evidence, when restorations stop depending on the input.

    Two cases: the spread ratio falls below `ratio` after a validation where it was above (a collapse), or
    it has never been above by a validation past half of the run (a model that never learned to depend on
    its input, e.g. saturated from the first steps by too high an lr). An untrained U-Net is flat, so a
    low ratio early in a run is not a warning by itself."""

    def __init__(self, max_steps: int, ratio: float = COLLAPSE_RATIO):
        self.max_steps, self.ratio = int(max_steps), float(ratio)
        self.healthy_at: int | None = None
        self.warned = False

    def check(self, step: int, metrics: dict) -> str | None:
        r = metrics.get("val/spread_ratio")
        if self.warned or r is None or not math.isfinite(r):
            return None
        if r >= self.ratio:
            self.healthy_at = step
            return None
        if self.healthy_at is None and 2 * step < self.max_steps:
            return None
        self.warned = True
        what = (f"restorations have collapsed at step {step} (they depended on the input at step {self.healthy_at})"
                if self.healthy_at is not None else
                f"restorations still do not depend on the input at step {step} of {self.max_steps}")
        return (f"{what}: across a batch they vary {r:.3f}x as much as the originals (per-pixel spread "
                f"{metrics['val/spread_restored']:.4f} vs {metrics['val/spread_original']:.4f}, threshold "
                f"{self.ratio:g}x); restored SSIM {metrics['val/ssim']:.4f} vs the mean training image's "
                f"{metrics['val/ssim_mean_image']:.4f}. Check the lr and the data")
