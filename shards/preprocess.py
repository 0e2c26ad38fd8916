"""Decode any raw image (bytes) into a square uint8 grayscale array at training size.

Every input goes through one function, `decode_and_preprocess`, which either returns an image or
raises `BadImage` whose message is the short skip reason the manifest records. Nothing else escapes:
PIL plugins raise a zoo of exception types on hostile bytes, and one bad file must not kill a build
that has run for hours.

Choices (documented because they change pixels):
- Alpha (LA, RGBA, PA, P with transparency) is composited on black: a transparent pixel carries no
  signal, and black is the X-ray background. In the real data almost every alpha is fully opaque.
- RGB -> L uses PIL's ITU-R 601-2 luma. For JPEG, `Image.draft` decodes the luma plane directly at a
  reduced DCT scale (never below the target size), which is several times faster and ~ equal.
- 16-bit and 32-bit integer (I;16, I;16B, I) and float (F) images are scaled by their real min..max
  range to 0..255, not clipped: a 12-bit detector image stored in 16 bits would otherwise be black.
  A constant image maps to 0. When the source knows a window (PadChest's CSV WindowCenter/Width),
  `window=(center, width)` applies it instead, by the DICOM linear rule (`shards.dicom.window_unit`).
- DICOM files (the 'DICM' preamble) go through `shards.dicom`: Modality LUT, then VOI LUT or window,
  MONOCHROME1 inverted; see that module for the rule. Pixel spacing and view come back in the info.
- bit_depth=16 keeps 16 bits: the same rules scaled to 0..65535 (8-bit inputs are multiplied by 257)
  and a uint16 result, resized in float (LANCZOS) and rounded.
- EXIF orientation is applied, so phone photos of films stand upright.
- square="crop" center-crops to the short side; square="pad" pads the long side with 0 (black).
- Resizing uses LANCZOS with a reducing gap (integer box reduce first, then LANCZOS), deterministic.
- Truncated files are rejected (PIL's LOAD_TRUNCATED_IMAGES must stay False) and PNG chunk CRCs are
  verified, so bit flips in PNGs are caught rather than silently decoded into garbage.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageFile

MAX_PIXELS = 100_000_000  # declared pixels above this are a decompression bomb, never decoded
ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "TIFF", "BMP", "GIF", "WEBP", "PPM")
SQUARE_MODES = ("crop", "pad")
BIT_DEPTHS = (8, 16)
_REDUCING_GAP = 2.0  # box-reduce to >= 2x the target first: ~4x faster, mean |diff| 0.3 grey levels
_PNG_IEND = b"\0\0\0\0IEND\xaeB`\x82"  # the only valid IEND chunk (empty, fixed CRC)
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "I;32", "F")


class BadImage(Exception):
    """An input that cannot become a training image; `str(exc)` is the skip reason."""


def decode_and_preprocess(data: bytes, size: int = 512, square: str = "crop", window=None,
                          bit_depth: int = 8) -> tuple[np.ndarray, dict]:
    """Return (uint8 array size x size, {"orig_size": [w, h], "orig_mode": mode, "orig_format": fmt}).

    With bit_depth=16 the array is uint16. `window` is (center, width) for high-bit images that carry
    no window of their own (PadChest PNGs); DICOM files use their own VOI.
    """
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit_depth must be one of {BIT_DEPTHS}, not {bit_depth}")
    if square not in SQUARE_MODES:
        raise ValueError(f"square must be one of {SQUARE_MODES}, not {square!r}")
    if size < 1:
        raise ValueError(f"size must be positive, not {size}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone flipped PIL's global; truncated files would then be padded silently.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    if not data:
        raise BadImage("zero bytes")
    try:
        from shards import dicom
        if dicom.is_dicom(data):
            try:
                unit, info = dicom.decode(bytes(data), MAX_PIXELS)
            except dicom._Bad as exc:
                raise BadImage(str(exc)) from None
            return _finish_unit(unit, size, square, bit_depth), info
        return _decode(bytes(data), size, square, window, bit_depth)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(_bomb_reason(str(exc))) from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image") from None
    except Exception as exc:  # noqa: BLE001 - see module docstring: any decoder failure is a skip reason
        raise BadImage(_reason(exc)) from None


def _finish_unit(unit: np.ndarray, size: int, square: str, bit_depth: int) -> np.ndarray:
    """Values in [0, 1] -> square, resized, at the wanted bit depth."""
    if bit_depth == 8:
        gray = Image.fromarray(np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8), mode="L")
        return np.asarray(_square_resize(gray, size, square), dtype=np.uint8).copy()
    f = Image.fromarray(np.asarray(unit * 65535.0, dtype=np.float32), mode="F")
    out = np.asarray(_square_resize(f, size, square), dtype=np.float64)
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


def _decode(data: bytes, size: int, square: str, window=None, bit_depth: int = 8) -> tuple[np.ndarray, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = _open(data)
        w, h = im.size
        if w <= 0 or h <= 0:
            raise BadImage(f"empty image ({w}x{h})")
        if w * h > MAX_PIXELS:
            raise BadImage(f"decompression bomb ({w}x{h})")
        fmt, mode = im.format or "", im.mode
        if fmt == "PNG":
            if _PNG_IEND not in data:
                raise BadImage("truncated image")  # PIL decodes a PNG cut inside its IEND chunk
            _open(data).verify()  # chunk CRCs: catches bit flips the decoder would not notice
        orientation = _exif_orientation(im)
        if fmt in ("JPEG", "MPO") and mode in ("RGB", "L", "YCbCr"):
            im.draft("L", (size, size))  # decode at 1/2, 1/4 or 1/8 scale, never below the target
        im.load()
    info = {"orig_size": [int(w), int(h)], "orig_mode": mode, "orig_format": fmt}
    high_bit = mode in _HIGH_BIT_MODES or mode.startswith("I;16")
    if high_bit and (window is not None or bit_depth == 16):
        unit = _high_bit_unit(im, window)
        if window is not None:
            info["window"] = [float(window[0]), float(window[1])]
        if orientation in _TRANSPOSE:
            unit = np.asarray(Image.fromarray(unit.astype(np.float32), "F").transpose(_TRANSPOSE[orientation]),
                              dtype=np.float64)
        return _finish_unit(unit, size, square, bit_depth), info
    gray = _to_gray(im)
    if orientation in _TRANSPOSE:
        gray = gray.transpose(_TRANSPOSE[orientation])
    if bit_depth == 16:
        return _finish_unit(np.asarray(gray, dtype=np.float64) / 255.0, size, square, 16), info
    out = _square_resize(gray, size, square)
    arr = np.asarray(out, dtype=np.uint8).copy()
    return arr, info


def _high_bit_values(im: Image.Image) -> np.ndarray:
    if im.mode == "F":
        return np.asarray(im, dtype=np.float64)
    try:
        arr = np.asarray(im).astype(np.float64)
    except (TypeError, ValueError):
        arr = np.asarray(im.convert("I"), dtype=np.float64)
    if arr.ndim != 2:
        raise BadImage(f"unreadable mode {im.mode}")
    return arr


def _high_bit_unit(im: Image.Image, window) -> np.ndarray:
    """A 16/32-bit image -> [0, 1]: by `window` (center, width) when given, else its real min..max."""
    from shards.dicom import range_unit, window_unit

    values = _high_bit_values(im)
    if window is not None:
        return window_unit(np.where(np.isfinite(values), values, 0.0), float(window[0]), float(window[1]))
    return range_unit(values)


def _open(data: bytes) -> Image.Image:
    Image.init()  # registers every plugin once (idempotent); `formats` only names registered ones
    return Image.open(io.BytesIO(data), formats=[f for f in ALLOWED_FORMATS if f in Image.OPEN])


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        return 1


def _to_gray(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 'L' (8-bit grayscale); see the module docstring for the choices."""
    mode = im.mode
    if mode == "L":
        return im
    if mode == "1":
        return im.convert("L")
    if mode in _HIGH_BIT_MODES or mode.startswith("I;16"):
        return _scale_to_uint8(im)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        if mode == "LA":
            lum = np.asarray(im.getchannel(0), dtype=np.uint32)
            alpha = np.asarray(im.getchannel(1), dtype=np.uint32)
        else:
            rgba = im.convert("LA" if mode == "La" else "RGBA")
            lum = np.asarray(rgba.convert("L"), dtype=np.uint32)
            alpha = np.asarray(rgba.getchannel(rgba.mode.index("A")), dtype=np.uint32)
        return Image.fromarray(((lum * alpha + 127) // 255).astype(np.uint8), mode="L")
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return (im if mode == "RGB" else im.convert("RGB")).convert("L")
    try:
        return im.convert("RGB").convert("L")
    except (ValueError, OSError):
        raise BadImage(f"unreadable mode {mode}") from None


def _scale_to_uint8(im: Image.Image) -> Image.Image:
    """Map the image's real min..max range linearly onto 0..255 (rounded)."""
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
    else:
        try:
            arr = np.asarray(im).astype(np.float64)
        except (TypeError, ValueError):
            arr = np.asarray(im.convert("I"), dtype=np.float64)
    if arr.ndim != 2:
        raise BadImage(f"unreadable mode {im.mode}")
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.new("L", im.size, 0)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    arr = np.where(finite, arr, lo)
    if hi <= lo:
        return Image.new("L", im.size, 0)
    scaled = np.rint((arr - lo) * (255.0 / (hi - lo)))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def _square_resize(im: Image.Image, size: int, square: str) -> Image.Image:
    w, h = im.size
    if square == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        if s == size:
            return im
        return im.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
    # pad: scale the long side to `size`, then centre on black
    s = max(w, h)
    nw, nh = max(1, round(w * size / s)), max(1, round(h * size / s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
    if (nw, nh) == (size, size):
        return im
    canvas = Image.new(im.mode, (size, size), 0)
    canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def _bomb_reason(message: str) -> str:
    m = re.search(r"\((\d+) pixels\)", message)
    return f"decompression bomb ({m.group(1)} pixels)" if m else "decompression bomb"


def _reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError) or "end of file" in text:
        return "truncated image"
    if "crc" in text or "checksum" in text:
        return "corrupt image (checksum)"
    if "broken" in text:
        return "corrupt image (broken data stream)"
    if isinstance(exc, MemoryError):
        return "image too large to decode"
    return f"corrupt image ({type(exc).__name__})"
