"""U-Net with CBAM attention for Models Genesis restoration, and the encoder export that downstream loads.

The U-Net is segmentation-models-pytorch's `Unet` (1 input channel, 1 sigmoid output, no downloaded
weights). timm's `CbamModule` goes into smp's two attention slots of every decoder block: after the skip
concatenation (`attention1`) and after the block's convolutions (`attention2`). The innermost-resolution
block has no skip, so smp never calls its `attention1`; it stays an Identity there, because a module that
gets no gradient would make data-parallel gradient reduction fail.

Export contract (docs/ARCHITECTURE.md): `RUN/encoder.pt` is the plain smp encoder `state_dict()`, which
loads with `torch.load(weights_only=True)` into `smp.Unet(name, in_channels=1, encoder_weights=None).encoder`;
`RUN/encoder.json` describes it. Encoder-side CBAM weights, when used, go to `RUN/encoder_cbam.pt`.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runkit.atomic import atomic_write_bytes, atomic_write_json
from runkit.errors import UserError

ENCODER_FORMAT = "xray-genesis-encoder/1"
KNOWN_ENCODERS = ("densenet121", "resnet18", "resnet34", "resnet50")


def _cbam(channels: int) -> nn.Module:
    from timm.layers.cbam import CbamModule

    # rd_ratio 1/16 as in the CBAM paper; at least 1 hidden unit for narrow decoder stages.
    return CbamModule(channels, rd_channels=max(1, channels // 16))


class CbamEncoder(nn.Module):
    """An smp encoder whose stage outputs (except the raw input) each pass through a CBAM block."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.cbam = nn.ModuleList([nn.Identity()] + [_cbam(c) for c in list(encoder.out_channels)[1:]])

    @property
    def output_stride(self) -> int:
        return self.encoder.output_stride

    @property
    def out_channels(self):
        return self.encoder.out_channels

    def forward(self, x):
        return [att(f) for att, f in zip(self.cbam, self.encoder(x))]


def check_encoder_name(name: str) -> None:
    import segmentation_models_pytorch as smp

    if name.startswith("tu-"):
        import timm

        if not timm.is_model(name[3:]):
            raise UserError(f"unknown timm encoder {name!r} (no timm model named {name[3:]!r})")
        return
    if name not in smp.encoders.get_encoder_names():
        raise UserError(f"unknown encoder {name!r}; try one of {', '.join(KNOWN_ENCODERS)} or a 'tu-<timm name>'")


def build_unet(encoder: str = "densenet121", cbam_decoder: bool = True, cbam_encoder: bool = False,
               decoder_channels=(256, 128, 64, 32, 16)) -> nn.Module:
    """smp.Unet(in_channels=1, classes=1, sigmoid) with CBAM in every decoder block (and optionally the encoder)."""
    import segmentation_models_pytorch as smp

    check_encoder_name(encoder)
    model = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=1, classes=1,
                     activation="sigmoid", decoder_channels=tuple(decoder_channels))
    if cbam_decoder:
        for block in model.decoder.blocks:
            in_ch = block.conv1[0].in_channels  # in + skip channels, i.e. what attention1 sees
            out_ch = block.conv2[0].out_channels
            has_skip = in_ch != _block_input_channels(model, block)
            block.attention1 = _cbam(in_ch) if has_skip else nn.Identity()
            block.attention2 = _cbam(out_ch)
    if cbam_encoder:
        model.encoder = CbamEncoder(model.encoder)
    return model


def _block_input_channels(model: nn.Module, block: nn.Module) -> int:
    """Channels coming up from the previous decoder stage (without the skip)."""
    blocks = list(model.decoder.blocks)
    i = blocks.index(block)
    if i == 0:
        return list(model.encoder.out_channels)[-1]
    return blocks[i - 1].conv2[0].out_channels


def plain_encoder(model: nn.Module) -> nn.Module:
    enc = model.encoder
    return enc.encoder if isinstance(enc, CbamEncoder) else enc


def _save_state(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def export_encoder(model: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write OUT/encoder.pt (+ encoder_cbam.pt) then OUT/encoder.json, each atomically; json last = complete.

    `meta` must hold at least `encoder` and `image_size`; anything else (step, val metrics) is recorded.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    _save_state(out / "encoder.pt", plain_encoder(model).state_dict())
    cbam_encoder = isinstance(model.encoder, CbamEncoder)
    if cbam_encoder:
        _save_state(out / "encoder_cbam.pt", model.encoder.cbam.state_dict())
    cbam_decoder = any(type(b.attention2).__name__ == "CbamModule" for b in model.decoder.blocks)
    desc = {"format": ENCODER_FORMAT, "encoder": meta["encoder"], "in_channels": 1,
            "image_size": int(meta["image_size"]), "input_range": [0, 1],
            "cbam_encoder": cbam_encoder, "cbam_decoder": cbam_decoder,
            "weights": "encoder.pt", "cbam_weights": "encoder_cbam.pt" if cbam_encoder else None}
    desc.update({k: v for k, v in meta.items() if k not in desc})
    atomic_write_json(out / "encoder.json", desc)
    return out / "encoder.pt"


def load_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the smp encoder (with its CBAM stages if it had them) from encoder.pt/encoder.json.

    `path` is the run folder, encoder.pt or encoder.json. Returns (encoder module, description).
    """
    import segmentation_models_pytorch as smp

    p = Path(path)
    run = p if p.is_dir() else p.parent
    desc_path = run / "encoder.json"
    if not desc_path.is_file():
        raise UserError(f"{desc_path} not found: an exported encoder needs encoder.json beside encoder.pt")
    try:
        desc = json.loads(desc_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{desc_path} is not valid JSON: {exc}") from None
    if desc.get("format") != ENCODER_FORMAT:
        raise UserError(f"{desc_path}: format {desc.get('format')!r} is not {ENCODER_FORMAT!r}")
    weights = run / (desc.get("weights") or "encoder.pt")
    if p.is_file() and p.suffix == ".pt":
        weights = p
    state = _load_state(weights)
    unet = smp.Unet(encoder_name=desc["encoder"], encoder_weights=None, in_channels=desc.get("in_channels", 1))
    encoder = unet.encoder
    _strict_load(encoder, state, weights)
    if desc.get("cbam_encoder"):
        wrapped = CbamEncoder(encoder)
        cbam_path = run / (desc.get("cbam_weights") or "encoder_cbam.pt")
        _strict_load(wrapped.cbam, _load_state(cbam_path), cbam_path)
        encoder = wrapped
    return encoder, desc


def _load_state(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"encoder weights {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any pickle/zip error on an untrusted or damaged file
        raise UserError(f"{path} cannot be loaded as a plain state dict: {str(exc).splitlines()[0]}") from None


def _strict_load(module: nn.Module, state: dict, path: Path) -> None:
    want = set(module.state_dict())
    have = set(state)
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise UserError(f"{path} does not match the architecture: missing keys {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected keys "
                        f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    # nn.Module's own method: smp's DenseNetEncoder overrides load_state_dict without `strict`
    nn.Module.load_state_dict(module, state, strict=True)


def encoder_to_torchvision_densenet(state: dict) -> dict:
    """smp densenet121 encoder state -> state for `torchvision.models.densenet121().features` (3-channel input).

    smp keys are `features.*`; the 1-channel conv0 is repeated over 3 input channels and divided by 3,
    so a gray image replicated to 3 channels gives exactly the same features.
    """
    out = {}
    for k, v in state.items():
        if not k.startswith("features."):
            raise UserError(f"not a densenet encoder state: unexpected key {k!r}")
        out[k[len("features."):]] = v
    w = out["conv0.weight"]
    if w.shape[1] == 1:
        out["conv0.weight"] = w.repeat(1, 3, 1, 1) / 3.0
    return out
