"""PadChest (BIMCV): the labels CSV plus 16-bit grayscale PNGs in numbered folders.

`--src` holds `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv` (or `.csv.gz`; any single
`PADCHEST*.csv[.gz]` is accepted) and the image folders `<ImageDir>/<ImageID>` (ImageDir is the
folder number, 0..54 in the full release). The first CSV column is an unnamed row index (ignored).

- Views: `Projection`; `--views frontal` keeps PA, AP and AP_horizontal (L, COSTAL, EXCLUDE and
  UNK are dropped).
- Labels: `Labels` is a Python-style list (`['pneumonia', 'infiltrates']`), read with
  `ast.literal_eval` (no code runs); each name is stripped and kept in `labels.source_labels` (=1).
  Names with an NIH-14 meaning map to `findings` (`PADCHEST_TO_NIH`). diagnosis: `['normal']` ->
  normal; any pneumonia label -> pneumonia; other labels -> other; an empty list, or only
  `exclude` / `suboptimal study` -> unknown.
- Pixels: the PNGs are 16-bit. When `WindowCenter_DICOM` and `WindowWidth_DICOM` are numbers, that
  window maps them to 8 bits (the DICOM rule in `shards.preprocess`); otherwise the image's real
  min..max range does. Either way nothing is truncated to the low byte.
- Splits: a hash of PatientID (64 / 16 / 20 % of patients); there is no official split.
"""
from __future__ import annotations

import ast
import math
from collections.abc import Iterator
from pathlib import Path

from runkit.errors import UserError
from shards.sources import (
    Candidate,
    RawItem,
    Skipped,
    finish,
    keep_view,
    missing_fields,
    options_of,
    read_csv,
    require_dir,
    safe_file_name,
)

SOURCE = "padchest"
CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
REQUIRED = ("ImageID", "ImageDir", "PatientID", "Projection", "Labels")
PADCHEST_TO_NIH = {
    "atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
    "pulmonary edema": "Edema", "pleural effusion": "Effusion", "emphysema": "Emphysema",
    "pulmonary fibrosis": "Fibrosis", "hiatal hernia": "Hernia", "infiltrates": "Infiltration",
    "mass": "Mass", "pulmonary mass": "Mass", "nodule": "Nodule", "pleural thickening": "Pleural_Thickening",
    "pneumonia": "Pneumonia", "pneumothorax": "Pneumothorax",
}
_NOT_FINDINGS = {"exclude", "suboptimal study", "unchanged"}


def find_labels_csv(src: Path) -> Path:
    for p in (src / CSV_NAME, src / f"{CSV_NAME}.gz"):
        if p.is_file():
            return p
    found = sorted(p for p in src.glob("PADCHEST*.csv*") if p.suffix in (".csv", ".gz") and p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"no PadChest labels CSV in {src}: expected {CSV_NAME}[.gz]")
    raise UserError(f"several PADCHEST*.csv files in {src} ({', '.join(p.name for p in found)}); keep one")


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    opts = options_of(opts)
    src = require_dir(src, SOURCE)
    rows = read_csv(find_labels_csv(src), REQUIRED)
    return _iter(src, rows, opts)


def parse_labels(text: str) -> list[str] | None:
    """"['normal']" -> ['normal']; "[' pneumonia', 'infiltrates']" -> ['pneumonia', 'infiltrates'];
    blank / nan / [] -> []; anything that is not a list of strings -> None."""
    t = text.strip()
    if t in ("", "nan", "[]"):
        return []
    try:
        value = ast.literal_eval(t)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None
    return sorted({" ".join(v.split()).lower() for v in value if v.strip()})


def diagnosis_of(labels: list[str]) -> str | None:
    real = [x for x in labels if x not in _NOT_FINDINGS]
    if not real:
        return None
    if real == ["normal"]:
        return "normal"
    if any("pneumonia" in x for x in real):
        return "pneumonia"
    return "other"


def parse_window(center: str | None, width: str | None) -> list[float] | None:
    """WindowCenter/Width from the CSV: numbers (the first of a list) with width > 0, else None."""
    def first(text):
        t = (text or "").strip().strip("[]").split(",")[0].strip().strip("'\"")
        try:
            return float(t)
        except ValueError:
            return None
    c, w = first(center), first(width)
    if c is None or w is None or not w > 0 or math.isnan(c):
        return None
    return [c, w]


def _iter(src: Path, rows, opts) -> Iterator[RawItem | Skipped]:
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for i, row in enumerate(rows, start=2):
        name = row.get("ImageID") or f"labels csv line {i}"
        gone = missing_fields(row, ("ImageID", "ImageDir", "PatientID"))
        if gone:
            skipped.append(Skipped(name, f"csv row missing fields: {', '.join(gone)}"))
            continue
        if not keep_view(row["Projection"], opts):
            continue
        folder = row["ImageDir"].strip()
        folder = folder.removesuffix(".0")
        if not safe_file_name(row["ImageID"]) or not safe_file_name(folder):
            skipped.append(Skipped(name, "unsafe file name"))
            continue
        labels = parse_labels(row["Labels"])
        if labels is None:
            skipped.append(Skipped(name, "unparseable Labels list"))
            continue
        findings = sorted({PADCHEST_TO_NIH[x] for x in labels if x in PADCHEST_TO_NIH})
        diagnosis = diagnosis_of(labels)
        meta = {"sex": row.get("PatientSex_DICOM", ""), "study_id": row.get("StudyID", ""),
                "photometric": row.get("PhotometricInterpretation_DICOM", ""),
                "bits_stored": row.get("BitsStored_DICOM", ""), "folder": folder}
        window = parse_window(row.get("WindowCenter_DICOM"), row.get("WindowWidth_DICOM"))
        if window:
            meta["window"] = window
        candidates.append(Candidate(
            name=row["ImageID"], path=src / folder / row["ImageID"], patient_id=row["PatientID"],
            view=row["Projection"], diagnosis=diagnosis, findings=findings if diagnosis else None,
            source_labels={x: 1 for x in labels}, meta=meta,
        ))
    return finish(SOURCE, candidates, skipped)
