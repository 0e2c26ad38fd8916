"""RSNA Pneumonia Detection Challenge (Kaggle 2018): `stage_2_train_labels.csv` plus DICOM images.

`--src` holds `stage_2_train_labels.csv` (patientId, x, y, width, height, Target; one row per box,
one row with blank box for Target 0), optionally `stage_2_detailed_class_info.csv` (patientId,
class: Normal / No Lung Opacity / Not Normal / Lung Opacity), and `stage_2_train_images/<patientId>.dcm`
(DICOM CR, decoded by `shards.dicom`; pixel spacing and view come from the file into `meta`).

- One image per patientId. Target is 1 when any row of the patient says 1; the boxes go to
  `meta.boxes`.
- diagnosis: Target 1 -> pneumonia (the challenge's label is "evidence of pneumonia"); else class
  Normal -> normal, "No Lung Opacity / Not Normal" -> other; Target 0 without the class file -> unknown.
  findings: ["Pneumonia"] for Target 1, [] for Normal, unknown otherwise. `labels.source_labels`
  holds the class (or "Lung Opacity" for Target 1 when there is no class file).
- Splits: a hash of patientId. The stage-2 test images have no labels and are not read.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from shards.sources import (
    Candidate,
    RawItem,
    Skipped,
    finish,
    missing_fields,
    options_of,
    read_csv,
    require_dir,
    safe_file_name,
)

SOURCE = "rsna"
LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
REQUIRED = ("patientId", "Target")
CLASSES = {"Normal": "normal", "No Lung Opacity / Not Normal": "other", "Lung Opacity": "pneumonia"}


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    opts = options_of(opts)
    src = require_dir(src, SOURCE)
    rows = read_csv(src / LABELS_CSV, REQUIRED)
    classes = read_csv(src / CLASS_CSV, ("patientId", "class")) if (src / CLASS_CSV).is_file() else None
    return _iter(src, rows, classes, opts.views)


def _iter(src: Path, rows, class_rows, views: str) -> Iterator[RawItem | Skipped]:
    skipped: list[Skipped] = []
    class_of = {r["patientId"]: r["class"] for r in class_rows or [] if r.get("patientId")}
    per_patient: dict[str, list[dict]] = defaultdict(list)
    for i, row in enumerate(rows, start=2):
        name = row.get("patientId") or f"{LABELS_CSV} line {i}"
        gone = missing_fields(row, REQUIRED)
        if gone:
            skipped.append(Skipped(name, f"csv row missing fields: {', '.join(gone)}"))
            continue
        if row["Target"] not in ("0", "1"):
            skipped.append(Skipped(name, f"bad Target {row['Target']!r}"))
            continue
        if not safe_file_name(row["patientId"]):
            skipped.append(Skipped(name, "unsafe file name"))
            continue
        per_patient[row["patientId"]].append(row)
    candidates: list[Candidate] = []
    for pid, prow in per_patient.items():
        target = int(any(r["Target"] == "1" for r in prow))
        cls = class_of.get(pid)
        if cls is not None and cls not in CLASSES:
            skipped.append(Skipped(f"{pid}.dcm", f"unknown class {cls!r}"))
            continue
        if target:
            diagnosis, findings = "pneumonia", ["Pneumonia"]
            cls = cls or "Lung Opacity"
        elif cls is None:
            diagnosis, findings = None, None
        else:
            diagnosis = CLASSES[cls]
            findings = [] if diagnosis == "normal" else None
        boxes = []
        for r in prow:
            try:
                boxes.append([float(r["x"]), float(r["y"]), float(r["width"]), float(r["height"])])
            except (KeyError, ValueError):
                pass
        candidates.append(Candidate(
            name=f"{pid}.dcm", path=src / IMAGE_DIR / f"{pid}.dcm", patient_id=pid, diagnosis=diagnosis,
            findings=findings, source_labels={cls: 1} if cls else {"Lung Opacity": 0},
            meta={"target": target, "boxes": boxes, "view_filter": views},
        ))
    return finish(SOURCE, candidates, skipped)
