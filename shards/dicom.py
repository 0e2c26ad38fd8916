"""DICOM (Part 10 files) -> intensities in [0, 1], through pydicom and its pixel plugins.

Compressed transfer syntaxes decode through pydicom's plugins: RLE Lossless natively, JPEG
baseline/extended through Pillow, JPEG 2000 through pylibjpeg-openjpeg (both default dependencies);
JPEG Lossless and JPEG-LS through pylibjpeg-libjpeg (GPLv3, the optional `dicom-jpeg` extra) or
python-gdcm when installed. A transfer syntax that no installed plugin decodes, a file that is not DICOM, or pixel data
that does not decode raises `BadImage` with a one-line reason: it becomes a skip, never a crash.

The display rule (documented because it sets every pixel; `shards.preprocess` turns the result into
8 bits, or 16 with --bit-depth 16, as rint(value * (2**bits - 1))):
1. Modality LUT first: the Modality LUT Sequence if present, else RescaleSlope/RescaleIntercept.
2. Then the VOI, the first one the file has:
   a. a VOI LUT Sequence (its first LUT): output / (2**n - 1), n the LUT's bits per entry;
   b. WindowCenter/WindowWidth (the first pair) with VOILUTFunction LINEAR (the default),
      LINEAR_EXACT or SIGMOID, as in PS3.3 C.11.2.1.2;
   c. no VOI: the image's real min..max maps to 0..1 (the rule 16-bit PNGs follow too).
3. MONOCHROME1 (high values are dark) is inverted: value -> 1 - value, so lungs are dark in the shard.
RGB / YBR images (rare: secondary captures) become ITU-R 601 luma of their 8-bit samples.
Multi-frame files use their first frame. Pixel spacing (PixelSpacing, else ImagerPixelSpacing)
and ViewPosition are returned for `meta`.
"""
from __future__ import annotations

import io
import warnings

import numpy as np

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")


class _Bad(Exception):
    """Raised inside; `shards.preprocess` re-raises it as BadImage with the same text."""


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then 'DICM'."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def window_unit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2: the window as a map onto [0, 1]."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # LINEAR with width 1 is a threshold at the center
        return (values >= center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def range_unit(values: np.ndarray) -> np.ndarray:
    """The real min..max range onto [0, 1]; non-finite values count as the minimum; constant -> 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    values = np.where(finite, values, lo)
    if hi <= lo:
        return np.zeros(values.shape)
    return (values - lo) / (hi - lo)


def _first(value) -> float:
    if value is None:
        raise ValueError("missing")
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except TypeError:
        return float(value)


def decode(data: bytes, max_pixels: int) -> tuple[np.ndarray, dict]:
    """(float64 HxW in [0, 1] after the display rule, info). Raises _Bad with the skip reason."""
    import pydicom
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.pixels.processing import apply_modality_lut, apply_voi

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on hostile bytes
        raise _Bad(f"corrupt dicom ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise _Bad("dicom without pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_name = getattr(ts, "name", str(ts)) if ts else "unknown"
    if ts is None:
        raise _Bad("dicom without a transfer syntax")
    try:
        decoder = get_decoder(ts)
    except (NotImplementedError, ValueError):
        raise _Bad(f"unsupported transfer syntax {ts_name} ({ts})") from None
    if not decoder.is_available:
        raise _Bad(f"unsupported transfer syntax {ts_name}: no decoder installed "
                   f"(pylibjpeg-libjpeg, pylibjpeg-openjpeg or python-gdcm)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in MONOCHROME + COLOR:
        raise _Bad(f"unsupported photometric interpretation {photometric or '(none)'}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise _Bad(f"empty image ({cols}x{rows})")
    if rows * cols > max_pixels:
        raise _Bad(f"decompression bomb ({cols}x{rows})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data, any plugin
        raise _Bad(f"corrupt dicom pixel data ({type(exc).__name__})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    info = {"orig_size": [cols, rows], "orig_format": "DICOM", "transfer_syntax": ts_name,
            "photometric": photometric, "bits_stored": int(ds.get("BitsStored", 0) or 0),
            "orig_mode": f"{photometric} {int(ds.get('BitsStored', 0) or 0)}-bit"}
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is not None:
        try:
            info["pixel_spacing"] = [float(v) for v in spacing][:2]
        except (TypeError, ValueError):
            pass
    view = str(ds.get("ViewPosition", "") or "").strip()
    if view:
        info["view"] = view
    if spp == 3 or photometric in COLOR:
        rgb = np.asarray(arr, dtype=np.float64)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise _Bad(f"unsupported pixel layout {arr.shape}")
        luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        info["voi"] = "range"
        return range_unit(luma), info
    if arr.ndim != 2:
        raise _Bad(f"unsupported pixel layout {arr.shape}")
    try:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        seq = ds.get("VOILUTSequence")
        if seq:
            item = seq[0]
            bits = int(item.LUTDescriptor[2])
            out = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), dtype=np.float64)
            unit = np.clip(out / float(2 ** bits - 1), 0.0, 1.0)
            info["voi"] = f"lut ({bits}-bit)"
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            if not width > 0:
                raise ValueError("window width must be positive")
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
            unit = window_unit(values, center, width, function)
            info["voi"] = f"window {center:g}/{width:g} {function.upper()}"
        else:
            unit = range_unit(values)
            info["voi"] = "range"
    except _Bad:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed LUT or window elements
        raise _Bad(f"corrupt dicom LUT or window ({type(exc).__name__})") from None
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit, info
