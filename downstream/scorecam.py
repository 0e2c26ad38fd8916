"""Score-CAM (Wang et al., CVPR-W 2020): gradient-free class activation maps on the last encoder stage.

Each activation channel A_k, upsampled to the image and min-max normalised to [0,1], masks the input; the
class probability of the masked image is that channel's weight (the paper's "increase of confidence",
as in the authors' reference code, which uses the softmax score itself). The map is ReLU(sum_k w_k A_k),
normalised to [0,1]. Masks act on the [0,1] image, before the backbone's own preprocessing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def score_cam(model, images: torch.Tensor, target=None, *, batch_size: int = 64, max_channels: int | None = None,
              baseline: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [B,H,W] in [0,1] for `images` [B,1,H,W] in [0,1] (uint8 is accepted) and the class index each
    map explains (`target`, default: the predicted class).

    `model` is a `downstream.finetune.Classifier` (backbone feature map + head). `max_channels` keeps the
    most active channels only, trading fidelity for speed; `baseline` subtracts the score of a black image.
    """
    model.eval()
    x_all = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    b, _, h, w = x_all.shape
    logits = model(x_all)
    classes = logits.argmax(1) if target is None else torch.as_tensor(target).long().expand(b).clone()
    base = model(torch.zeros_like(x_all[:1])).softmax(1)[0] if baseline else None
    maps = torch.zeros(b, h, w)
    for i in range(b):
        x = x_all[i:i + 1]
        acts = model.backbone(x)[0]  # [K, h', w']
        if max_channels and acts.shape[0] > max_channels:
            acts = acts[acts.mean(dim=(1, 2)).topk(max_channels).indices]
        up = F.interpolate(acts[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        lo = up.flatten(1).min(1).values.view(-1, 1, 1)
        hi = up.flatten(1).max(1).values.view(-1, 1, 1)
        masks = torch.where(hi > lo, (up - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(up))
        c = int(classes[i])
        scores = []
        for s in range(0, masks.shape[0], batch_size):
            m = masks[s:s + batch_size, None]
            scores.append(model(x * m).softmax(1)[:, c])
        weights = torch.cat(scores)
        if base is not None:
            weights = weights - base[c]
        cam = F.relu((weights.view(-1, 1, 1) * up).sum(0))
        rng = cam.max() - cam.min()
        maps[i] = (cam - cam.min()) / rng if rng > 0 else torch.zeros_like(cam)
    return maps, classes
