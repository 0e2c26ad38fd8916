"""Phantoms in the download layouts of CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, RSNA Pneumonia
and a plain image tree (`folder`), DICOM written with pydicom. `python -m shards synth` calls these.

Images are `shards.phantom` radiographs whose NIH-mappable findings are rendered, drawn from
`default_rng([seed, data set, 0, index])` (patients from `[seed, data set, 1, patient]`), so the
same seed gives byte-identical files. DICOM variants cycle through the cases a reader must handle:
MONOCHROME1 / MONOCHROME2, 12- and 16-bit stored values, a rescale (Modality LUT), a window or a
VOI LUT Sequence, and the compressed transfer syntaxes RLE Lossless (pydicom) and JPEG 2000
Lossless (pylibjpeg-openjpeg, when installed). Ground truth (labels as drawn, the DICOM variant)
goes to `<parent>/truth/<name>/labels.json`.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from runkit.atomic import atomic_write_json, atomic_write_text
from shards import phantom
from shards.png import encode_png
from shards.sources import CHEXPERT_LABELS, CHEXPERT_TO_NIH
from shards.synth import MARKER, _check, _nih_lesions, _prepare

_CHEXPERT, _MIMIC, _PADCHEST, _VINDR, _RSNA, _FOLDER = 11, 12, 13, 14, 15, 16
_NIH_OF = {v: k for k, v in CHEXPERT_TO_NIH.items()}  # NIH name -> CheXpert name
DICOM_VARIANTS = ("mono2-12bit-window", "mono1-12bit", "mono2-16bit-rescale-voilut", "mono1-16bit-window-rle",
                  "mono2-12bit-jpeg2000", "mono2-8bit")


def _prep(out_dir) -> tuple[Path, Path]:
    out_dir, tdir = _prepare(out_dir)
    (out_dir / "images").rmdir()  # these layouts have no images/ folder
    atomic_write_json(tdir / MARKER, {"format": out_dir.name, "complete": False})  # a crash leaves it replaceable
    return out_dir, tdir


def _finish(out_dir: Path, tdir: Path, fmt: str, n: int, size: int, seed: int, truth: dict) -> Path:
    atomic_write_text(tdir / "labels.json", json.dumps(truth, indent=1, sort_keys=True) + "\n")
    atomic_write_json(tdir / MARKER, {"format": fmt, "n": n, "size": size, "seed": seed})
    return out_dir


def _image(kind: int, seed: int, i: int, p: int, size: int, findings: list[str], view: str = "PA") -> np.ndarray:
    prng = np.random.default_rng([seed, kind, 1, p])
    anat = phantom.sample_anatomy(prng)
    rng = np.random.default_rng([seed, kind, 0, i])
    lesions, cardio = _nih_lesions(rng, [f for f in findings if f in phantom_findings()])
    img = phantom.render(size, anat, lesions, "AP" if view.upper().startswith("AP") else "PA", rng,
                         cardiomegaly=cardio).image
    if view.upper() in ("LATERAL", "LL", "L", "RL"):
        img = np.ascontiguousarray(img.T[:, ::-1])  # not anatomy; only so a lateral differs from a frontal
    return img


def phantom_findings() -> set[str]:
    from shards.synth import NIH_RENDERED
    return set(NIH_RENDERED)


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _gz(text: str) -> bytes:
    return gzip.compress(text.encode(), mtime=0)


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _patients(seed: int, kind: int, n: int, max_images: int):
    from shards.synth import _patients as gen
    return gen(kind, seed, n, max_images)


# ----------------------------------------------------------------------------- DICOM

def dicom_bytes(stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                bits_allocated: int = 16, rescale: tuple[float, float] | None = None,
                window: tuple[float, float] | None = None, voi_function: str | None = None,
                voi_lut: tuple[int, int, np.ndarray] | None = None, modality_lut: tuple[int, int, np.ndarray] | None = None,
                transfer_syntax: str = "explicit", view: str = "PA", spacing: float | None = 0.14,
                uid_seed: str = "0", modality: str = "DX") -> bytes:
    """One DICOM Part 10 file (pydicom) holding `stored` (the stored values) and the given pixel modules.

    voi_lut / modality_lut: (first mapped value, bits per entry, table). transfer_syntax: 'explicit'
    (Explicit VR Little Endian), 'implicit', 'rle' (RLE Lossless) or 'jpeg2000' (JPEG 2000 Lossless).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
        generate_uid,
    )

    stored = np.asarray(stored)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["xray-genesis phantom", uid_seed])
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if transfer_syntax == "implicit" else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", uid_seed])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", uid_seed])
    ds.Modality = modality
    ds.PatientID = uid_seed
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = (int(v) for v in stored.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if spacing is not None:
        ds.PixelSpacing = [spacing, spacing]
        ds.ImagerPixelSpacing = [spacing, spacing]
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if modality_lut is not None:
        first, bits, table = modality_lut
        item = Dataset()
        item.LUTDescriptor = [len(table), first, bits]
        item.ModalityLUTType = "US"
        item.LUTData = np.asarray(table, dtype="<u2").tobytes()
        ds.ModalityLUTSequence = Sequence([item])
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
        if voi_function:
            ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        first, bits, table = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(table), first, bits]
        item.LUTData = np.asarray(table, dtype="<u2").tobytes()
        ds.VOILUTSequence = Sequence([item])
    dtype = "<u1" if bits_allocated == 8 else "<u2"
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    if transfer_syntax == "rle":
        ds.compress(RLELossless, generate_instance_uid=False)
    elif transfer_syntax == "jpeg2000":
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    elif transfer_syntax not in ("explicit", "implicit"):
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def jpeg2000_available() -> bool:
    try:
        from pydicom.pixels.encoders import JPEG2000LosslessEncoder
        return bool(JPEG2000LosslessEncoder.is_available)
    except ImportError:
        return False


def dicom_variant(img: np.ndarray, variant: str, uid_seed: str, view: str = "PA") -> bytes:
    """The phantom `img` (uint8, dark lungs) stored as one of DICOM_VARIANTS; decoding gives back ~img."""
    x = img.astype(np.float64) / 255.0
    if variant == "mono2-12bit-window":
        stored = np.rint(x * 4000 + 50)
        return dicom_bytes(stored, window=(2050, 4001), uid_seed=uid_seed, view=view)
    if variant == "mono1-12bit":
        stored = np.rint((1 - x) * 4095)
        return dicom_bytes(stored, photometric="MONOCHROME1", uid_seed=uid_seed, view=view)
    if variant == "mono2-16bit-rescale-voilut":
        stored = np.rint(x * 60000 + 1000)          # rescale 0.5, -500 -> 0 .. 29500
        table = np.rint(np.linspace(0, 4095, 29501)).astype(np.uint16)
        return dicom_bytes(stored, bits_stored=16, rescale=(0.5, -500.0), voi_lut=(0, 12, table),
                           uid_seed=uid_seed, view=view)
    if variant == "mono1-16bit-window-rle":
        stored = np.rint((1 - x) * 65535)
        return dicom_bytes(stored, photometric="MONOCHROME1", bits_stored=16, window=(32767.5, 65535),
                           voi_function="LINEAR_EXACT", transfer_syntax="rle", uid_seed=uid_seed, view=view)
    if variant == "mono2-12bit-jpeg2000":
        stored = np.rint(x * 4095)
        ts = "jpeg2000" if jpeg2000_available() else "rle"
        return dicom_bytes(stored, transfer_syntax=ts, uid_seed=uid_seed, view=view)
    if variant == "mono2-8bit":
        return dicom_bytes(img, bits_stored=8, bits_allocated=8, window=(127.5, 255), voi_function="LINEAR_EXACT",
                           uid_seed=uid_seed, view=view, modality="CR")
    raise ValueError(f"unknown DICOM variant {variant!r}")


# ----------------------------------------------------------------------------- CheXpert

def _chexpert_values(rng: np.random.Generator, valid: bool) -> dict[str, str]:
    """One row's 14 observations as CSV text: '1.0', '0.0', '-1.0' or '' (valid.csv: 0/1 only)."""
    vals = {}
    for name in CHEXPERT_LABELS[1:]:
        r = rng.random()
        if valid:
            vals[name] = "1.0" if r < 0.15 else "0.0"
        else:
            vals[name] = "1.0" if r < 0.12 else "-1.0" if r < 0.2 else "0.0" if r < 0.35 else ""
    positive = any(v == "1.0" for v in vals.values())
    vals["No Finding"] = ("0.0" if valid else "") if positive else "1.0"
    return vals


def synth_chexpert(out_dir, n: int, size: int = 128, seed: int = 0, small: bool = True, progress: bool = False) -> Path:
    """CheXpert-v1.0-small (or v1.0) layout: `<out>/CheXpert-v1.0-small/{train,valid}.csv` + jpgs."""
    _check(n, size)
    out_dir, tdir = _prep(out_dir)
    name = "CheXpert-v1.0-small" if small else "CheXpert-v1.0"
    root = out_dir / name
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    rows = {"train": [], "valid": []}
    truth = {}
    n_valid_patients = max(1, n // 40)
    studies: dict[int, int] = {}
    for i, p, k in _patients(seed, _CHEXPERT, n, 3):
        split = "valid" if p < n_valid_patients else "train"
        prng = np.random.default_rng([seed, _CHEXPERT, 1, p])
        sex, age = str(prng.choice(["Male", "Female"])), int(prng.integers(18, 90))
        rng = np.random.default_rng([seed, _CHEXPERT, 3, i])
        study = 1 + k // 2 if k else 1
        view_no = studies.get((p, study), 0) + 1
        studies[(p, study)] = view_no
        lateral = k % 2 == 1 and rng.random() < 0.6
        vals = _chexpert_values(rng, split == "valid")
        findings = sorted(CHEXPERT_TO_NIH[c] for c, v in vals.items() if v == "1.0" and c in CHEXPERT_TO_NIH)
        appa = "" if lateral else str(rng.choice(["AP", "PA"], p=[0.7, 0.3]))
        img = _image(_CHEXPERT, seed, i, p, size, findings, "LATERAL" if lateral else appa)
        rel = f"{split}/patient{p + 1:05d}/study{study}/view{view_no}_{'lateral' if lateral else 'frontal'}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_jpeg(img))
        rows[split].append([f"{name}/{rel}", sex, str(age), "Lateral" if lateral else "Frontal", appa,
                            *[vals[c] for c in CHEXPERT_LABELS]])
        truth[rel] = {"findings": findings, "labels": vals, "lateral": lateral}
    atomic_write_text(root / "train.csv", _csv_text(header, rows["train"]))
    atomic_write_text(root / "valid.csv", _csv_text(header, rows["valid"]))
    return _finish(out_dir, tdir, "chexpert", n, size, seed, truth)


# ----------------------------------------------------------------------------- MIMIC-CXR-JPG

def synth_mimic(out_dir, n: int, size: int = 128, seed: int = 0, progress: bool = False) -> Path:
    """MIMIC-CXR-JPG 2.0.0: the four `mimic-cxr-2.0.0-*.csv.gz` files + files/pXX/pSUBJECT/sSTUDY/*.jpg."""
    _check(n, size)
    out_dir, tdir = _prep(out_dir)
    meta_rows, split_rows, studies, truth = [], [], {}, {}
    for i, p, k in _patients(seed, _MIMIC, n, 4):
        subject = str(10_000_000 + 7919 * p + seed % 1000)
        rng = np.random.default_rng([seed, _MIMIC, 3, i])
        study = str(50_000_000 + 104_729 * p + 13 * (k // 2))
        if study not in studies:
            studies[study] = (subject, _chexpert_values(rng, False), _chexpert_values(rng, False))
        vals = studies[study][1]
        findings = sorted(CHEXPERT_TO_NIH[c] for c, v in vals.items() if v == "1.0" and c in CHEXPERT_TO_NIH)
        view = str(rng.choice(["PA", "AP", "LATERAL", ""], p=[0.45, 0.35, 0.15, 0.05]))
        dicom_id = "-".join(rng.bytes(4).hex() for _ in range(5))
        img = _image(_MIMIC, seed, i, p, size, findings, view or "PA")
        path = out_dir / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(img))
        meta_rows.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, str(size), str(size)])
        split = "test" if p % 10 == 0 else "validate" if p % 10 == 1 else "train"
        split_rows.append([dicom_id, study, subject, split])
        truth[dicom_id] = {"findings": findings, "view": view, "split": split, "study": study}
    label_header = ["subject_id", "study_id", *sorted(CHEXPERT_LABELS)]
    chex = [[s, st, *[studies[st][1][c] for c in sorted(CHEXPERT_LABELS)]] for st, (s, _, _) in studies.items()]
    negbio = [[s, st, *[studies[st][2][c] for c in sorted(CHEXPERT_LABELS)]] for st, (s, _, _) in studies.items()]
    pre = "mimic-cxr-2.0.0"
    (out_dir / f"{pre}-metadata.csv.gz").write_bytes(_gz(_csv_text(
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
         "Columns"], meta_rows)))
    (out_dir / f"{pre}-chexpert.csv.gz").write_bytes(_gz(_csv_text(label_header, chex[:-1] if len(chex) > 2 else chex)))
    (out_dir / f"{pre}-negbio.csv.gz").write_bytes(_gz(_csv_text(label_header, negbio)))
    (out_dir / f"{pre}-split.csv.gz").write_bytes(_gz(_csv_text(["dicom_id", "study_id", "subject_id", "split"],
                                                                split_rows)))
    return _finish(out_dir, tdir, "mimic", n, size, seed, truth)


# ----------------------------------------------------------------------------- PadChest

PADCHEST_COLUMNS = ("", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection",
                    "PhotometricInterpretation_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM",
                    "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM", "Labels")
PADCHEST_DRAWN = {"Pneumonia": "pneumonia", "Effusion": "pleural effusion", "Cardiomegaly": "cardiomegaly",
                  "Atelectasis": "atelectasis", "Nodule": "nodule", "Infiltration": "infiltrates"}


def padchest_png(img: np.ndarray, windowed: bool) -> tuple[bytes, tuple[float, float] | None]:
    """A 16-bit PNG of `img` with 12 significant bits plus an offset; the window that recovers it."""
    stored = np.rint(img.astype(np.float64) / 255.0 * 4000 + 300).astype(np.uint16)
    return encode_png(stored, 1), ((2300.0, 4001.0) if windowed else None)


def synth_padchest(out_dir, n: int, size: int = 128, seed: int = 0, progress: bool = False) -> Path:
    _check(n, size)
    out_dir, tdir = _prep(out_dir)
    rows, truth = [], {}
    for i, p, k in _patients(seed, _PADCHEST, n, 3):
        rng = np.random.default_rng([seed, _PADCHEST, 3, i])
        drawn = sorted(str(x) for x in rng.choice(list(PADCHEST_DRAWN), size=int(rng.integers(0, 3)), replace=False))
        labels = [PADCHEST_DRAWN[f] for f in drawn]
        if not labels:
            labels = ["normal"] if rng.random() < 0.8 else ["exclude"]
        elif rng.random() < 0.3:
            labels.append("chronic changes")  # a PadChest label without an NIH-14 meaning
        projection = str(rng.choice(["PA", "AP", "AP_horizontal", "L"], p=[0.5, 0.2, 0.1, 0.2]))
        img = _image(_PADCHEST, seed, i, p, size, drawn, "LATERAL" if projection == "L" else projection)
        windowed = bool(rng.random() < 0.5)
        data, window = padchest_png(img, windowed)
        image_id = f"{216840111366964012 + 7 * i}_{p:02d}-{k:03d}.png"
        folder = str(i % 3)
        (out_dir / folder).mkdir(exist_ok=True)
        (out_dir / folder / image_id).write_bytes(data)
        pid = f"{100000 + 31 * p}"
        text = "[" + ", ".join(repr(x if j else f" {x}") for j, x in enumerate(labels)) + "]"
        rows.append([str(i), image_id, folder, "20150101", f"st{p}-{k}", pid, "1950", "M" if p % 2 else "F",
                     "['POSTEROANTERIOR']" if projection == "PA" else "None", projection, "Manual review of DICOM fields",
                     "MONOCHROME2", "12", str(window[0]) if window else "None", str(window[1]) if window else "None",
                     str(size), str(size), text])
        truth[image_id] = {"labels": sorted(set(labels)), "projection": projection, "window": window}
    atomic_write_text(out_dir / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", _csv_text(PADCHEST_COLUMNS, rows))
    return _finish(out_dir, tdir, "padchest", n, size, seed, truth)


# ----------------------------------------------------------------------------- VinDr-CXR (Kaggle)

VINDR_CLASSES = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
                 "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
                 "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "No finding")
_VINDR_RENDER = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
                 "Infiltration": "Infiltration", "Pleural effusion": "Effusion", "Pneumothorax": "Pneumothorax",
                 "Nodule/Mass": "Nodule"}


def synth_vindr(out_dir, n: int, size: int = 128, seed: int = 0, progress: bool = False) -> Path:
    _check(n, size)
    out_dir, tdir = _prep(out_dir)
    (out_dir / "train").mkdir()
    rows, truth = [], {}
    for i in range(n):
        rng = np.random.default_rng([seed, _VINDR, 3, i])
        image_id = rng.bytes(16).hex()
        classes = sorted(str(c) for c in rng.choice(
            [c for c in VINDR_CLASSES[:-1] if c in _VINDR_RENDER or c == "Aortic enlargement"],
            size=int(rng.choice([0, 0, 1, 2])), replace=False))
        rads = ["R8", "R9", "R10"]
        for r, rad in enumerate(rads):
            mine = [c for c in classes if r == 0 or rng.random() < 0.5]
            if not mine:
                rows.append([image_id, "No finding", "14", rad, "", "", "", ""])
            for c in mine:
                x0, y0 = rng.integers(0, size // 2, 2)
                rows.append([image_id, c, str(VINDR_CLASSES.index(c)), rad, f"{x0:.1f}", f"{y0:.1f}",
                             f"{x0 + size / 4:.1f}", f"{y0 + size / 4:.1f}"])
        img = _image(_VINDR, seed, i, i, size, [_VINDR_RENDER[c] for c in classes if c in _VINDR_RENDER])
        variant = DICOM_VARIANTS[i % len(DICOM_VARIANTS)]
        (out_dir / "train" / f"{image_id}.dicom").write_bytes(dicom_variant(img, variant, f"vindr-{seed}-{i}"))
        truth[image_id] = {"classes": classes, "variant": variant}
    atomic_write_text(out_dir / "train.csv", _csv_text(
        ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"], rows))
    return _finish(out_dir, tdir, "vindr", n, size, seed, truth)


# ----------------------------------------------------------------------------- RSNA Pneumonia

RSNA_CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")


def _uuid(rng: np.random.Generator) -> str:
    h = rng.bytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def synth_rsna(out_dir, n: int, size: int = 128, seed: int = 0, progress: bool = False,
               extra: list[tuple[str, np.ndarray]] | None = None) -> Path:
    """RSNA layout; `extra` (name, uint8 image) adds planted images as 8-bit DICOM with class Normal."""
    _check(n, size)
    out_dir, tdir = _prep(out_dir)
    (out_dir / "stage_2_train_images").mkdir()
    label_rows, class_rows, truth = [], [], {}
    for i in range(n):
        rng = np.random.default_rng([seed, _RSNA, 3, i])
        pid = _uuid(rng)
        cls = str(rng.choice(RSNA_CLASSES, p=[0.35, 0.35, 0.3]))
        img = _image(_RSNA, seed, i, i, size, ["Pneumonia"] if cls == "Lung Opacity" else [],
                     str(rng.choice(["AP", "PA"])))
        if cls == "Lung Opacity":
            for _ in range(int(rng.integers(1, 3))):
                x, y = rng.integers(0, size // 2, 2)
                label_rows.append([pid, f"{x:.1f}", f"{y:.1f}", f"{size / 4:.1f}", f"{size / 3:.1f}", "1"])
        else:
            label_rows.append([pid, "", "", "", "", "0"])
        class_rows.append([pid, cls])
        variant = "mono2-8bit" if i % 2 == 0 else "mono1-12bit"
        (out_dir / "stage_2_train_images" / f"{pid}.dcm").write_bytes(
            dicom_variant(img, variant, f"rsna-{seed}-{i}", view="AP" if i % 3 else "PA"))
        truth[pid] = {"class": cls, "variant": variant}
    for name, img in extra or []:
        label_rows.append([name, "", "", "", "", "0"])
        class_rows.append([name, "Normal"])
        (out_dir / "stage_2_train_images" / f"{name}.dcm").write_bytes(dicom_variant(img, "mono2-8bit", name))
        truth[name] = {"class": "Normal", "variant": "mono2-8bit", "planted_duplicate": True}
    atomic_write_text(out_dir / "stage_2_train_labels.csv",
                      _csv_text(["patientId", "x", "y", "width", "height", "Target"], label_rows))
    atomic_write_text(out_dir / "stage_2_detailed_class_info.csv", _csv_text(["patientId", "class"], class_rows))
    return _finish(out_dir, tdir, "rsna", n, size, seed, truth)


# ----------------------------------------------------------------------------- folder

def synth_folder(out_dir, n: int, size: int = 128, seed: int = 0, progress: bool = False,
                 extra: list[tuple[str, np.ndarray]] | None = None) -> Path:
    """A tree of PNG / JPEG / DICOM files with a `labels.csv` for half of them."""
    _check(n, size)
    out_dir, tdir = _prep(out_dir)
    rows, truth = [], {}
    for i in range(n):
        rng = np.random.default_rng([seed, _FOLDER, 3, i])
        img = _image(_FOLDER, seed, i, i, size, [])
        kind = ("png", "jpg", "dcm")[i % 3]
        rel = f"site{i % 2}/batch{i % 4}/img{i:04d}.{kind}"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        data = encode_png(img, 1) if kind == "png" else _jpeg(img) if kind == "jpg" else \
            dicom_variant(img, "mono1-12bit", f"folder-{seed}-{i}")
        (out_dir / rel).write_bytes(data)
        if i % 2 == 0:
            rows.append([rel, f"pt{i // 4}", "PA", "normal" if rng.random() < 0.5 else "other", ""])
        truth[rel] = {"labelled": i % 2 == 0}
    for name, img in extra or []:
        rel = f"reused/{name}.png"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / rel).write_bytes(encode_png(img, 6))  # same pixels, other bytes than the original
        truth[rel] = {"planted_duplicate": True}
    atomic_write_text(out_dir / "labels.csv", _csv_text(["path", "patient_id", "view", "diagnosis", "findings"], rows))
    return _finish(out_dir, tdir, "folder", n, size, seed, truth)


WRITERS = {"chexpert": synth_chexpert, "mimic": synth_mimic, "padchest": synth_padchest, "vindr": synth_vindr,
           "rsna": synth_rsna, "folder": synth_folder}
