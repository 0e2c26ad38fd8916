"""Pixel-mode conversion, square/resize geometry and the BadImage contract of shards.preprocess."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from shards.preprocess import BadImage, decode_and_preprocess


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=96, h=96) -> np.ndarray:
    """A horizontal 0..255 ramp: easy to predict after crop/resize."""
    return np.tile(np.linspace(0, 255, w), (h, 1)).round().astype(np.uint8)


def png_with_ihdr(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but holds a single tiny IDAT: nothing is allocated."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- modes

def test_l_image_at_its_own_size_is_unchanged():
    arr = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    out, info = decode_and_preprocess(encode(Image.fromarray(arr)), size=64)
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    np.testing.assert_array_equal(out, arr)
    assert info == {"orig_size": [64, 64], "orig_mode": "L", "orig_format": "PNG"}


def test_rgb_uses_luma():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    out, info = decode_and_preprocess(encode(Image.fromarray(rgb)), size=32)
    expected = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)
    assert info["orig_mode"] == "RGB"
    assert np.abs(out.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_black(mode):
    im = Image.new(mode, (32, 32), (200, 200, 200, 128) if mode == "RGBA" else (200, 128))
    out, _ = decode_and_preprocess(encode(im), size=32)
    assert np.all(np.abs(out.astype(int) - round(200 * 128 / 255)) <= 1)
    opaque = Image.new(mode, (32, 32), (200, 200, 200, 255) if mode == "RGBA" else (200, 255))
    assert np.all(decode_and_preprocess(encode(opaque), size=32)[0] == 200)


def test_palette_goes_through_the_palette():
    im = Image.new("P", (32, 32), 3)
    palette = [0, 0, 0] * 256
    palette[9:12] = [10, 250, 10]  # index 3 is green, far from the index value itself
    im.putpalette(palette)
    out, info = decode_and_preprocess(encode(im), size=32)
    assert info["orig_mode"] == "P"
    assert np.all(np.abs(out.astype(int) - round(10 * 0.299 + 250 * 0.587 + 10 * 0.114)) <= 1)


def test_palette_transparency_becomes_black():
    im = Image.new("P", (32, 32), 1)
    im.putpalette([255, 255, 255] * 256)
    out, _ = decode_and_preprocess(encode(im, transparency=1), size=32)
    assert np.all(out == 0)


def test_one_bit():
    arr = np.zeros((32, 32), bool)
    arr[:, 16:] = True
    out, info = decode_and_preprocess(encode(Image.fromarray(arr).convert("1")), size=32)
    assert info["orig_mode"] == "1"
    assert set(np.unique(out)) == {0, 255}
    assert out[:, :16].max() == 0 and out[:, 16:].min() == 255


def test_cmyk_jpeg_converts():
    im = Image.new("CMYK", (64, 64), (0, 0, 0, 0))  # no ink = white
    out, info = decode_and_preprocess(encode(im, "JPEG", quality=95), size=64)
    assert info["orig_mode"] == "CMYK"
    assert out.min() >= 250
    inked = Image.new("CMYK", (64, 64), (0, 0, 0, 255))  # full black ink
    assert decode_and_preprocess(encode(inked, "JPEG", quality=95), size=64)[0].max() <= 5


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_high_bit_depth_is_scaled_by_its_real_range(mode):
    ramp = np.tile(np.linspace(1000, 3000, 64), (64, 1)).round()
    if mode == "I":
        data = encode(Image.fromarray(ramp.astype(np.int32)), "TIFF")
    else:  # I;16 as PNG, big-endian I;16B as TIFF
        im = Image.frombytes(mode, (64, 64), ramp.astype("<u2" if mode == "I;16" else ">u2").tobytes())
        data = encode(im, "PNG" if mode == "I;16" else "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    out, _ = decode_and_preprocess(data, size=64)
    expected = np.tile(np.linspace(0, 255, 64), (64, 1))
    assert out[:, 0].max() <= 1 and out[:, -1].min() >= 254
    assert np.abs(out - expected).max() <= 1.0  # linear, not clipped at 255


def test_sixteen_bit_png_from_disk_format():
    """A real 16-bit grayscale PNG (as Actualmed ships) keeps its contrast."""
    arr = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)  # 12-bit detector in 16 bits
    out, info = decode_and_preprocess(encode(Image.fromarray(arr)), size=64)
    assert info["orig_mode"].startswith("I")
    assert out.min() == 0 and out.max() == 255


def test_float_with_nan_and_constant_images():
    arr = np.tile(np.linspace(-1.0, 1.0, 32), (32, 1)).astype(np.float32)
    arr[0, 0] = np.nan
    out, _ = decode_and_preprocess(encode(Image.fromarray(arr), "TIFF"), size=32)
    assert out[1, 0] == 0 and out[1, -1] == 255
    const = Image.fromarray(np.full((16, 16), 2000, np.uint16))
    assert decode_and_preprocess(encode(const), size=16)[0].max() == 0


# ----------------------------------------------------------------------------- geometry

def test_crop_takes_the_centre_and_pad_adds_black():
    wide = np.zeros((64, 128), np.uint8)
    wide[:, 32:96] = 255  # the central square is white, the flanks black
    data = encode(Image.fromarray(wide))
    cropped, info = decode_and_preprocess(data, size=64, square="crop")
    assert info["orig_size"] == [128, 64]
    assert cropped.min() == 255
    padded, _ = decode_and_preprocess(data, size=64, square="pad")
    assert padded[:16].max() == 0 and padded[-16:].max() == 0  # 128x64 -> 64x32 centred: 16 rows each side
    assert padded[20:44, 20:44].min() >= 250
    with pytest.raises(ValueError):
        decode_and_preprocess(data, size=64, square="stretch")


def test_resize_keeps_a_ramp_a_ramp():
    out, _ = decode_and_preprocess(encode(Image.fromarray(gradient(512, 512))), size=64)
    expected = np.tile(np.linspace(0, 255, 64), (64, 1))
    assert np.abs(out[:, 2:-2] - expected[:, 2:-2]).max() <= 3  # LANCZOS, edges excluded


def test_jpeg_draft_decode_matches_a_full_decode():
    rng = np.random.default_rng(1)
    arr = (gradient(1024, 1024).astype(float) * 0.8 + rng.normal(0, 5, (1024, 1024))).clip(0, 255).astype(np.uint8)
    data = encode(Image.fromarray(arr).convert("RGB"), "JPEG", quality=90)
    fast, info = decode_and_preprocess(data, size=128)
    assert info["orig_size"] == [1024, 1024]
    full = Image.open(io.BytesIO(data)).convert("L").resize((128, 128), Image.Resampling.LANCZOS)
    assert np.abs(fast.astype(int) - np.asarray(full, int)).mean() < 2.0


def test_exif_orientation_is_applied():
    arr = np.zeros((32, 64), np.uint8)
    arr[:, :32] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    out, info = decode_and_preprocess(data, size=32, square="pad")
    assert info["orig_size"] == [64, 32]
    assert out[:8, 8:24].mean() > 200 and out[-8:, 8:24].mean() < 50  # white half now on top


def test_deterministic():
    data = encode(Image.fromarray(gradient(300, 200)).convert("RGB"), "JPEG")
    a, _ = decode_and_preprocess(data, size=64)
    b, _ = decode_and_preprocess(data, size=64)
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_badimage_with_a_reason():
    good = encode(Image.fromarray(gradient()))
    cases = {
        b"": "zero bytes",
        b"hello, I am a text file pretending to be a PNG\n" * 10: "not an image",
        good[: len(good) // 2]: "truncated image",
        png_with_ihdr(40000, 40000): "decompression bomb",
    }
    for data, reason in cases.items():
        with pytest.raises(BadImage) as exc:
            decode_and_preprocess(data, size=32)
        assert str(exc.value).startswith(reason), (reason, str(exc.value))


def test_bomb_limit_holds_even_without_pils_guard(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(BadImage, match=r"decompression bomb \(12000x9000\)"):
        decode_and_preprocess(png_with_ihdr(12000, 9000), size=32)


def test_png_bit_flip_in_pixel_data_is_caught_by_crc():
    data = bytearray(encode(Image.fromarray(gradient())))
    idat = data.index(b"IDAT")
    data[idat + 30] ^= 0x10
    with pytest.raises(BadImage):
        decode_and_preprocess(bytes(data), size=32)


def test_truncated_images_are_never_padded(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_and_preprocess(encode(Image.fromarray(gradient())), size=32)


@pytest.mark.real
def test_real_images_of_every_mode_decode(shared_data):
    """A sample of the real COVID images (JPEG/PNG; L, RGB, RGBA, P) all decode to the asked size."""
    files = sorted((shared_data / "covid-chestxray-dataset" / "images").iterdir())
    modes = set()
    for path in files[::8]:
        out, info = decode_and_preprocess(path.read_bytes(), size=64)
        assert out.shape == (64, 64) and out.dtype == np.uint8
        assert out.std() > 5  # a real radiograph, not a blank
        modes.add(info["orig_mode"])
    assert {"L", "RGB", "RGBA"} <= modes
