"""One `Backbone` interface over encoders of every origin, so the heads never care where weights came from.

Spec strings (`load_backbone`):
- `RUN` or `RUN/encoder.pt`  our Models Genesis export (encoder.json beside it), input in [0, 1];
- `scratch[:arch]`           random init, smp encoder `arch` (default densenet121), 1 input channel;
- `xrv:FILE`                 a torchxrayvision DenseNet-121 *state dict* (18 outputs, 1 channel, [-1024, 1024], 224 px);
- `chexnet:FILE`             a CheXNet checkpoint (`module.densenet121.features...`, 3 channels, ImageNet norm, 14 outputs);
- `nih14:DIR`                our NIH-14 head (DIR/nih14.pt + nih14.json, written by `downstream.nih14`).

Every backbone takes images in [0, 1] shaped [B, 1, H, W] and applies its own input preprocessing, so
callers (and Score-CAM masks) always work in the same image space. Files load with weights_only=True.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runkit.errors import UserError
from runkit.statedict import strict_load

# torchxrayvision's "all" DenseNet-121 output order (MISSION.md).
XRV_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
# CheXNet (arnoweng/CheXNet) CLASS_NAMES order.
CHEXNET_PATHOLOGIES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NIH14_FORMAT = "xray-genesis-nih14/1"
# Old torchvision / CheXNet checkpoints name dense-layer parts `norm.1` instead of `norm1`.
_OLD_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class Preprocess(nn.Module):
    """[0, 1] gray -> what the weights were trained on (range, channels, normalisation)."""

    def __init__(self, kind: str = "unit"):
        super().__init__()
        if kind not in ("unit", "xrv", "imagenet"):
            raise ValueError(f"unknown preprocessing {kind!r}")
        self.kind = kind
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "xrv":
            return x * 2048.0 - 1024.0
        if self.kind == "imagenet":
            return (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return x

    def extra_repr(self) -> str:
        return self.kind


class SmpBody(nn.Module):
    """An smp encoder (optionally CBAM-wrapped) reduced to its deepest stage."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder(x)[-1]


class DenseBody(nn.Module):
    """torchvision-style `features` Sequential of a DenseNet; ReLU after norm5 as torchvision does."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x):
        return F.relu(self.features(x))


class Backbone(nn.Module):
    """preprocess -> body -> feature map; GAP -> pooled features; optional classifier -> named pathologies."""

    def __init__(self, body: nn.Module, num_features: int, *, kind: str, arch: str, image_size: int,
                 preprocess: str = "unit", classifier: nn.Linear | None = None,
                 pathology_names: tuple[str, ...] | None = None, relu_out: bool = False, desc: dict | None = None):
        super().__init__()
        self.body = body
        self.preprocess = Preprocess(preprocess)
        self.classifier = classifier
        self.num_features = int(num_features)
        self.kind, self.arch, self.image_size = kind, arch, int(image_size)
        self.pathology_names = tuple(pathology_names) if pathology_names else None
        self.relu_out = relu_out  # smp densenet stops at norm5 (no ReLU); torchvision applies one
        self.desc = dict(desc or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,1,H,W] in [0,1] -> last-stage feature map [B,C,h,w] (the Score-CAM layer)."""
        f = self.body(self.preprocess(x))
        return F.relu(f) if self.relu_out else f

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).mean(dim=(2, 3))

    def pathologies(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits of the pathology head, in `pathology_names` order (Cohen et al. use logits as features)."""
        if self.classifier is None:
            raise UserError(f"backbone {self.kind}:{self.arch} has no pathology outputs; use pooled features")
        return self.classifier(self.pooled(x))

    def stage_modules(self) -> list[nn.Module]:
        """Parameterised stages shallow -> deep, for partial unfreezing and discriminative learning rates."""
        root = self.body
        while True:
            kids = [m for m in root.children() if any(True for _ in m.parameters())]
            if len(kids) == 1 and not isinstance(kids[0], (nn.Conv2d, nn.Linear)):
                root = kids[0]
                continue
            return kids


# ------------------------------------------------------------------------------------------- loading


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a pickled whole model, or a damaged file
        raise UserError(f"{path} cannot be loaded with weights_only=True ({str(exc).splitlines()[0][:120]}); "
                        "save a plain state dict: torch.save(model.state_dict(), FILE)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return obj


def _fix_old_dense_keys(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        m = _OLD_DENSE_KEY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _densenet121(in_channels: int, num_classes: int):
    import torchvision

    m = torchvision.models.densenet121(weights=None, num_classes=num_classes)
    if in_channels != 3:
        m.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return m


def smp_encoder(arch: str) -> nn.Module:
    """A randomly initialised 1-channel smp encoder, the same module our pretraining exports."""
    import segmentation_models_pytorch as smp

    try:
        return smp.encoders.get_encoder(arch, in_channels=1, depth=5, weights=None)
    except (KeyError, ValueError) as exc:
        raise UserError(f"unknown encoder architecture {arch!r} ({str(exc).splitlines()[0][:100]})") from None


def _from_smp(encoder: nn.Module, *, kind: str, arch: str, image_size: int, desc: dict | None = None,
              classifier=None, pathology_names=None) -> Backbone:
    channels = list(encoder.out_channels)[-1]
    return Backbone(SmpBody(encoder), channels, kind=kind, arch=arch, image_size=image_size,
                    relu_out=arch.startswith("densenet"), classifier=classifier,
                    pathology_names=pathology_names, desc=desc)


def scratch_backbone(arch: str = "densenet121", image_size: int = 224) -> Backbone:
    return _from_smp(smp_encoder(arch), kind="scratch", arch=arch, image_size=image_size)


def encoder_backbone(path: str | Path) -> Backbone:
    from pretrain.model import load_encoder

    encoder, desc = load_encoder(path)
    return _from_smp(encoder, kind="genesis", arch=desc["encoder"], image_size=int(desc.get("image_size", 224)),
                     desc=desc)


def xrv_backbone(path: str | Path) -> Backbone:
    """torchxrayvision's DenseNet-121 (torchvision layout, 1 channel, 18 outputs) from a local state dict."""
    path = Path(path)
    state = _fix_old_dense_keys(_load_file(path))
    model = _densenet121(1, len(XRV_PATHOLOGIES))
    # xrv keeps operating-point thresholds as a buffer; they only rescale outputs and are not needed here.
    strict_load(model, state, path, ignore=("op_threshs",))
    return Backbone(DenseBody(model.features), 1024, kind="xrv", arch="densenet121", image_size=224,
                    preprocess="xrv", classifier=model.classifier, pathology_names=XRV_PATHOLOGIES)


def chexnet_backbone(path: str | Path) -> Backbone:
    """CheXNet (`module.densenet121.*`, classifier = Sequential(Linear, Sigmoid)): logits, not sigmoids."""
    path = Path(path)
    raw = _fix_old_dense_keys(_load_file(path))
    prefix = "module.densenet121."
    state = {}
    for k, v in raw.items():
        key = k.removeprefix(prefix)
        state[key.replace("classifier.0.", "classifier.", 1) if key.startswith("classifier.0.") else key] = v
    model = _densenet121(3, len(CHEXNET_PATHOLOGIES))
    try:
        strict_load(model, state, path)
    except UserError as exc:
        raise UserError(f"{exc} (CheXNet keys look like {prefix}features.conv0.weight and "
                        f"{prefix}classifier.0.weight)") from None
    return Backbone(DenseBody(model.features), 1024, kind="chexnet", arch="densenet121", image_size=224,
                    preprocess="imagenet", classifier=model.classifier, pathology_names=CHEXNET_PATHOLOGIES)


def save_nih14(backbone: Backbone, out_dir: str | Path, meta: dict | None = None) -> Path:
    """DIR/nih14.pt (encoder + 14-way classifier state) then DIR/nih14.json; loads back as `nih14:DIR`."""
    import io

    from runkit.atomic import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(backbone.body, SmpBody) or backbone.classifier is None:
        raise ValueError("save_nih14 needs an smp-encoder backbone with a classifier")
    state = {"encoder." + k: v for k, v in backbone.body.encoder.state_dict().items()}
    state.update({"classifier." + k: v for k, v in backbone.classifier.state_dict().items()})
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buf)
    atomic_write_bytes(out / "nih14.pt", buf.getvalue())
    cbam = type(backbone.body.encoder).__name__ == "CbamEncoder"
    desc = {"format": NIH14_FORMAT, "encoder": backbone.arch, "cbam_encoder": cbam,
            "image_size": backbone.image_size, "input_range": [0, 1],
            "findings": list(backbone.pathology_names or ()), **(meta or {})}
    atomic_write_json(out / "nih14.json", desc)
    return out / "nih14.pt"


def nih14_backbone(path: str | Path) -> Backbone:
    p = Path(path)
    run = p if p.is_dir() else p.parent
    desc_path = run / "nih14.json"
    if not desc_path.is_file():
        raise UserError(f"{desc_path} not found: `nih14:DIR` needs the folder written by `downstream.py nih14`")
    desc = json.loads(desc_path.read_text())
    if desc.get("format") != NIH14_FORMAT:
        raise UserError(f"{desc_path}: format {desc.get('format')!r} is not {NIH14_FORMAT!r}")
    encoder = smp_encoder(desc["encoder"])
    if desc.get("cbam_encoder"):
        from pretrain.model import CbamEncoder

        encoder = CbamEncoder(encoder)
    findings = tuple(desc["findings"])
    classifier = nn.Linear(list(encoder.out_channels)[-1], len(findings))
    holder = nn.Module()
    holder.encoder, holder.classifier = encoder, classifier
    strict_load(holder, _load_file(run / "nih14.pt"), run / "nih14.pt")
    return _from_smp(encoder, kind="nih14", arch=desc["encoder"], image_size=int(desc.get("image_size", 224)),
                     desc=desc, classifier=classifier, pathology_names=findings)


def load_backbone(spec: str, *, image_size: int | None = None) -> Backbone:
    """Parse a backbone spec (see the module docstring). `image_size` overrides the default for scratch."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("empty backbone spec; use RUN/encoder.pt, scratch[:arch], xrv:FILE, chexnet:FILE or nih14:DIR")
    head, _, rest = spec.partition(":")
    if head == "scratch":
        return scratch_backbone(rest or "densenet121", image_size or 224)
    if head == "xrv" and rest:
        return xrv_backbone(rest)
    if head == "chexnet" and rest:
        return chexnet_backbone(rest)
    if head == "nih14" and rest:
        return nih14_backbone(rest)
    p = Path(spec)
    if p.is_dir() or p.suffix in (".pt", ".json"):
        if not p.exists():
            raise UserError(f"backbone {spec}: no such file or folder")
        if p.is_dir() and not (p / "encoder.json").is_file() and (p / "nih14.json").is_file():
            return nih14_backbone(p)
        return encoder_backbone(p)
    raise UserError(f"backbone spec {spec!r} not understood; use RUN/encoder.pt, scratch[:arch], xrv:FILE, "
                    "chexnet:FILE or nih14:DIR")


def select_pathologies(names: tuple[str, ...], wanted: str | list[str]) -> list[int]:
    """Indices of named outputs; matching ignores case, spaces and underscores ('lung_opacity' = 'Lung Opacity')."""
    def norm(s: str) -> str:
        return re.sub(r"[\s_\-]+", "", s).lower()

    items = [w for w in (wanted.split(",") if isinstance(wanted, str) else wanted) if str(w).strip()]
    index = {norm(n): i for i, n in enumerate(names)}
    out = []
    for w in items:
        if norm(w) not in index:
            raise UserError(f"unknown pathology {w!r}; this backbone has: {', '.join(names)}")
        out.append(index[norm(w)])
    return out
