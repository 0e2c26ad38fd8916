"""Score-CAM (Wang et al., CVPR-W 2020): gradient-free class activation maps on an encoder stage.

Each activation channel A_k, upsampled to the image and min-max normalised to [0,1], masks the input; the
class probability of the masked image is that channel's weight (the paper's "increase of confidence",
as in the authors' reference code, which uses the softmax score itself). The map is ReLU(sum_k w_k A_k),
normalised to [0,1]. Masks act on the [0,1] image, before the backbone's own preprocessing.

Which stage: the paper uses the last convolutional stage, which at 224 px is 7x7 for DenseNet-121 and
ResNets. At small inputs that stage is too coarse to localise anything (2x2 for a ResNet at 64 px), so
`layer="auto"` (the default) takes the deepest stage whose smaller side is at least `AUTO_MIN_SIDE`
cells: the last stage at 128 px and above (7x7 at 224 px), the one before it at 64-96 px (4x4 at 64 px).
Since the weights come from forward passes of masked images, not from gradients, any stage is a valid
mask source. On the 64 px phantoms (tests/test_scorecam.py: 5-epoch ResNet-18, 18 test images, maps of
the true class) the mean map inside the rendered lesions over the mean outside was 1.42 for the 4x4
stage, 1.24 for the 2x2 last stage and 1.15 for the 8x8 stage (4x4: 1.36 on the validation images,
1.35 and 1.52 for a model trained with another seed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUTO_MIN_SIDE = 4


def stage_maps(backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps of every encoder stage of `backbone` (a `downstream.backbones.Backbone`) for `x`
    [B,1,H,W] in [0,1], shallow -> deep, without the raw input; the last one is `backbone(x)`.

    smp encoders (ours, scratch, nih14, CBAM-wrapped or not): their stage outputs (stride 2 ... 32).
    torchvision DenseNets (xrv, chexnet): relu0 and the output of each dense block, then the final map.
    Anything else: just the final map.
    """
    from downstream.backbones import DenseBody, SmpBody

    body = backbone.body
    h = backbone.preprocess(x)
    if isinstance(body, SmpBody):
        feats = list(body.encoder(h))[1:]
        if backbone.relu_out:
            feats[-1] = F.relu(feats[-1])
        return feats
    if isinstance(body, DenseBody):
        feats = []
        for name, module in body.features.named_children():
            h = module(h)
            if name == "relu0" or name in ("denseblock1", "denseblock2", "denseblock3"):
                feats.append(h)
        return feats + [F.relu(h)]
    return [backbone(x)]


def resolve_layer(shapes: list[tuple[int, int]], layer="auto") -> int:
    """Index into `stage_maps` for `layer`: an int (negative counts from the deepest stage) or "auto"
    (the deepest stage with both sides >= AUTO_MIN_SIDE; the finest stage if none is that large)."""
    if layer is None or layer == "auto":
        ok = [i for i, (hh, ww) in enumerate(shapes) if min(hh, ww) >= AUTO_MIN_SIDE]
        return ok[-1] if ok else 0
    i = int(layer)
    if not -len(shapes) <= i < len(shapes):
        raise ValueError(f"Score-CAM layer {layer} out of range: this encoder has {len(shapes)} stages {shapes}")
    return i % len(shapes)


@torch.no_grad()
def score_cam(model, images: torch.Tensor, target=None, *, batch_size: int = 64, max_channels: int | None = None,
              baseline: bool = False, layer="auto", device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [B,H,W] in [0,1] for `images` [B,1,H,W] in [0,1] (uint8 is accepted) and the class index each
    map explains (`target`, default: the predicted class).

    `model` is a `downstream.finetune.Classifier` (backbone feature map + head). `layer` picks the encoder
    stage whose channels make the masks (see `stage_maps`; -1 is the last stage, "auto" the deepest one
    that is at least AUTO_MIN_SIDE cells wide). `max_channels` keeps the most active channels only,
    trading fidelity for speed; `baseline` subtracts the score of a black image. It runs on `device`
    (default: the model's), uint8 images moving there before conversion, under bf16 autocast on CUDA;
    maps and classes come back on the CPU.
    """
    from downstream.device import autocast, to_float

    model.eval()
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    model.to(device)

    def probs(x):
        with autocast(device):
            return model(x).float().softmax(1)

    x_all = to_float(images, device)
    b, _, h, w = x_all.shape
    p_all = probs(x_all)
    classes = p_all.argmax(1).cpu() if target is None else torch.as_tensor(target).long().expand(b).clone()
    base = probs(torch.zeros_like(x_all[:1]))[0] if baseline else None
    maps = torch.zeros(b, h, w)
    for i in range(b):
        x = x_all[i:i + 1]
        with autocast(device):
            stages = [s.float() for s in stage_maps(model.backbone, x)]
        acts = stages[resolve_layer([tuple(s.shape[-2:]) for s in stages], layer)][0]  # [K, h', w']
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
            scores.append(probs(x * m)[:, c])
        weights = torch.cat(scores)
        if base is not None:
            weights = weights - base[c]
        cam = F.relu((weights.view(-1, 1, 1) * up).sum(0))
        rng = cam.max() - cam.min()
        maps[i] = ((cam - cam.min()) / rng if rng > 0 else torch.zeros_like(cam)).cpu()
    return maps, classes
