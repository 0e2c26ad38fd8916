"""DICOM decoding (shards.dicom through shards.preprocess) on files written here with pydicom.

Expected pixels are computed in each test from the stored values by the documented rule, written out
independently of the implementation: Modality LUT, then VOI LUT or window, MONOCHROME1 inverted,
then rint(value * 255)."""
from __future__ import annotations

import numpy as np
import pytest

from shards import phantom
from shards.preprocess import BadImage, decode_and_preprocess
from shards.synth_sources import dicom_bytes, jpeg2000_available

S = 32


def decode(data: bytes, bit_depth: int = 8) -> np.ndarray:
    return decode_and_preprocess(data, size=S, bit_depth=bit_depth)[0]


def ramp(lo: int, hi: int) -> np.ndarray:
    return np.rint(np.linspace(lo, hi, S * S)).reshape(S, S).astype(np.uint16)


def to8(unit) -> np.ndarray:
    return np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)


def test_monochrome2_12_bit_without_voi_uses_the_real_range():
    stored = ramp(100, 3000)
    want = to8((stored - 100.0) / 2900.0)
    assert np.array_equal(decode(dicom_bytes(stored, bits_stored=12)), want)


def test_16_bit_is_mapped_by_range_and_can_keep_16_bits():
    stored = ramp(0, 65535)
    assert np.array_equal(decode(dicom_bytes(stored, bits_stored=16)), to8(stored / 65535.0))
    kept = decode(dicom_bytes(stored, bits_stored=16), bit_depth=16)
    assert kept.dtype == np.uint16 and np.array_equal(kept, stored)  # nothing lost on a same-size image


def test_monochrome1_is_inverted_so_lungs_are_dark():
    ph = phantom.render(64, phantom.sample_anatomy(np.random.default_rng(0)), [], "PA", np.random.default_rng(1))
    lungs, heart = ph.masks["lung_left"] | ph.masks["lung_right"], ph.masks["heart"]
    x = ph.image.astype(np.float64) / 255.0
    mono1 = dicom_bytes(np.rint((1 - x) * 4095), photometric="MONOCHROME1", bits_stored=12)
    mono2 = dicom_bytes(np.rint(x * 4095), photometric="MONOCHROME2", bits_stored=12)
    out1 = decode_and_preprocess(mono1, size=64)[0]
    out2 = decode_and_preprocess(mono2, size=64)[0]
    assert out1[lungs].mean() < out1[heart].mean() - 20           # dark lungs, bright mediastinum
    assert np.abs(out1.astype(int) - out2).max() <= 1
    # without the inversion the stored values would show bright lungs
    raw = np.rint((1 - x) * 4095)
    assert raw[lungs].mean() > raw[heart].mean()


def test_window_linear_and_linear_exact():
    stored = ramp(0, 4095)
    c, w = 1500.0, 1001.0
    want = to8(np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0, 1))
    assert np.array_equal(decode(dicom_bytes(stored, window=(c, w))), want)
    want = to8(np.clip((stored - c) / w + 0.5, 0, 1))
    assert np.array_equal(decode(dicom_bytes(stored, window=(c, w), voi_function="LINEAR_EXACT")), want)
    sig = decode(dicom_bytes(stored, window=(c, w), voi_function="SIGMOID"))
    assert np.array_equal(sig, to8(1 / (1 + np.exp(-4 * (stored - c) / w))))


def test_modality_rescale_comes_before_the_window():
    stored = ramp(0, 4095)
    slope, intercept = 2.0, -1024.0
    c, w = 2000.0, 4000.0  # in rescaled units
    want = to8(np.clip((stored * slope + intercept - (c - 0.5)) / (w - 1) + 0.5, 0, 1))
    got = decode(dicom_bytes(stored, rescale=(slope, intercept), window=(c, w)))
    assert np.array_equal(got, want)
    unrescaled = to8(np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0, 1))
    assert not np.array_equal(got, unrescaled)


def test_modality_lut_sequence():
    stored = ramp(0, 1023)
    table = (np.arange(1024) ** 2 // 256).astype(np.uint16)   # a non-linear modality LUT, 0..4088
    got = decode(dicom_bytes(stored, bits_stored=10, modality_lut=(0, 16, table)))
    values = table[stored].astype(np.float64)
    assert np.array_equal(got, to8((values - values.min()) / (values.max() - values.min())))


def test_voi_lut_sequence_wins_over_a_window():
    stored = ramp(0, 4095)
    table = np.rint(4095 * (np.linspace(0, 1, 4096) ** 0.5)).astype(np.uint16)  # a gamma VOI LUT, 12-bit output
    got = decode(dicom_bytes(stored, voi_lut=(0, 12, table), window=(100, 10)))
    assert np.array_equal(got, to8(table[stored] / 4095.0))
    shifted = decode(dicom_bytes(stored, voi_lut=(1000, 12, table[:2048])))   # first mapped value 1000
    idx = np.clip(stored.astype(int) - 1000, 0, 2047)
    assert np.array_equal(shifted, to8(table[:2048][idx] / 4095.0))


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000"])
def test_lossless_compressed_twin_decodes_to_the_same_pixels(syntax):
    if syntax == "jpeg2000":  # pylibjpeg-openjpeg is a dependency (setup.cfg): missing is a failure, not a skip
        assert jpeg2000_available(), "pylibjpeg-openjpeg (install_requires) cannot encode/decode JPEG 2000"
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, (S, S)).astype(np.uint16)
    plain = dicom_bytes(stored, photometric="MONOCHROME1", bits_stored=12, window=(2000, 3000))
    packed = dicom_bytes(stored, photometric="MONOCHROME1", bits_stored=12, window=(2000, 3000),
                         transfer_syntax=syntax)
    assert packed != plain and len(packed) != len(plain)
    a, info = decode_and_preprocess(plain, size=S)
    b, info_b = decode_and_preprocess(packed, size=S)
    assert np.array_equal(a, b) and not np.all(a == a[0, 0])
    assert info_b["transfer_syntax"] != info["transfer_syntax"]
    assert np.array_equal(decode(plain, 16), decode(packed, 16))


def test_meta_keeps_spacing_and_view():
    _, info = decode_and_preprocess(dicom_bytes(ramp(0, 4095), spacing=0.168, view="AP"), size=S)
    assert info["pixel_spacing"] == [0.168, 0.168] and info["view"] == "AP"
    assert info["orig_format"] == "DICOM" and info["photometric"] == "MONOCHROME2"


def test_broken_and_unsupported_files_are_one_line_skip_reasons():
    good = dicom_bytes(ramp(0, 4095))
    cases = {
        "corrupt dicom pixel data": good[:-50],
        "dicom without pixel data": good[:200],
        "unsupported transfer syntax": _with_transfer_syntax(good, "1.2.840.10008.1.2.4.100"),  # MPEG2: no decoder
    }
    for want, data in cases.items():
        with pytest.raises(BadImage) as exc:
            decode(data)
        assert str(exc.value).startswith(want) and "\n" not in str(exc.value)
    with pytest.raises(BadImage, match="^(corrupt dicom|dicom without pixel data)"):
        decode(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)


def _with_transfer_syntax(data: bytes, uid: str) -> bytes:
    import io

    import pydicom
    from pydicom.encaps import encapsulate
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([b"\x00\x01" * 64])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_16_bit_shards_round_trip_through_the_stream(tmp_path):
    """--bit-depth 16: 16-bit PNGs in the shards, decoded to uint16 and scaled by 65535 by images_to_float."""
    import tarfile

    from shards.sources import get_source
    from shards.stream import decode_png, images_to_float, make_loader
    from shards.synth_sources import synth_vindr
    from shards.writer import build

    src = synth_vindr(tmp_path / "vindr", 6, size=64, seed=1)
    outs = {}
    for depth in (8, 16):
        outs[depth] = tmp_path / f"s{depth}"
        build(get_source("vindr").scan(src), outs[depth], source="vindr", size=32, progress=False, bit_depth=depth)
    for tar in sorted(outs[16].glob("*.tar")):
        with tarfile.open(tar) as t:
            png = next(t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".png"))
        assert png[24] == 16 and decode_png(png).dtype == np.uint16  # IHDR bit depth
    batches = {d: {k: img for b in make_loader(f"{outs[d]}/*.tar", mode="eval", batch_size=4, num_workers=0)
                   for k, img in zip(b["key"], images_to_float(b["image"]))} for d in outs}
    assert batches[8].keys() == batches[16].keys() and len(batches[8]) == 6
    for k, img16 in batches[16].items():
        assert 0 <= float(img16.min()) and float(img16.max()) <= 1
        diff = (img16 - batches[8][k]).abs()  # 8 bits are rounded before the resize, 16 bits after it
        assert float(diff.max()) <= 8 / 255 and float(diff.mean()) <= 0.5 / 255
