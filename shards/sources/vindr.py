"""VinDr-CXR, Kaggle's VinBigData copy: `train.csv` plus `train/<image_id>.dicom`.

`train.csv` has one row per radiologist finding: image_id, class_name, class_id, rad_id, x_min, y_min,
x_max, y_max (boxes blank for "No finding", class 14). Each image was read by several radiologists.

- Labels per image: a class is present (=1 in `labels.source_labels`) when any radiologist marked it;
  the number of radiologists per class is `meta.votes`, the boxes are `meta.boxes`. diagnosis:
  normal when every row of the image says "No finding", else other (the 14 classes hold no
  pneumonia). Classes with an NIH-14 meaning map to `findings` (`VINDR_TO_NIH`; "Nodule/Mass" is
  both nodule and mass, so it stays a source label only).
- Images: DICOM (`.dicom`, `.dcm` also accepted), decoded by `shards.dicom` (MONOCHROME1 is common
  here); pixel spacing and view come from the file into `meta`. Laterals are not in this set.
- Splits: the images carry no patient id (de-identified), so every image is its own patient group and
  a hash of image_id gives train / val / test. The Kaggle test images have no labels and are not read.
"""
from __future__ import annotations

from collections import Counter, defaultdict
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

SOURCE = "vindr"
CSV_NAME = "train.csv"
IMAGE_DIR = "train"
REQUIRED = ("image_id", "class_name", "rad_id")
NO_FINDING = "No finding"
VINDR_TO_NIH = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
                "Infiltration": "Infiltration", "Pleural effusion": "Effusion",
                "Pleural thickening": "Pleural_Thickening", "Pneumothorax": "Pneumothorax",
                "Pulmonary fibrosis": "Fibrosis"}
BOX = ("x_min", "y_min", "x_max", "y_max")


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    opts = options_of(opts)
    src = require_dir(src, SOURCE)
    rows = read_csv(src / CSV_NAME, REQUIRED)
    return _iter(src, rows, opts.views)


def locate(src: Path, image_id: str) -> Path:
    for suffix in (".dicom", ".dcm"):
        p = src / IMAGE_DIR / f"{image_id}{suffix}"
        if p.is_file():
            return p
    return src / IMAGE_DIR / f"{image_id}.dicom"


def _box(row: dict[str, str]) -> list[float] | None:
    try:
        return [float(row[k]) for k in BOX]
    except (KeyError, ValueError):
        return None


def _iter(src: Path, rows, views: str) -> Iterator[RawItem | Skipped]:
    skipped: list[Skipped] = []
    per_image: dict[str, list[dict]] = defaultdict(list)
    for i, row in enumerate(rows, start=2):
        name = row.get("image_id") or f"{CSV_NAME} line {i}"
        gone = missing_fields(row, REQUIRED)
        if gone:
            skipped.append(Skipped(name, f"csv row missing fields: {', '.join(gone)}"))
            continue
        if not safe_file_name(row["image_id"]):
            skipped.append(Skipped(name, "unsafe file name"))
            continue
        per_image[row["image_id"]].append(row)
    candidates: list[Candidate] = []
    for image_id, image_rows in per_image.items():
        votes = Counter()
        for cls in {(r["class_name"], r["rad_id"]) for r in image_rows}:
            votes[cls[0]] += 1
        classes = sorted(c for c in votes if c != NO_FINDING)
        boxes = [{"class_name": r["class_name"], "rad_id": r["rad_id"], "box": _box(r)}
                 for r in image_rows if r["class_name"] != NO_FINDING and _box(r)]
        source_labels = {c: 1 for c in classes} if classes else {NO_FINDING: 1}
        candidates.append(Candidate(
            name=image_id, path=locate(src, image_id), patient_id=image_id,
            diagnosis="other" if classes else "normal",
            findings=sorted({VINDR_TO_NIH[c] for c in classes if c in VINDR_TO_NIH}),
            source_labels=source_labels,
            meta={"votes": dict(sorted(votes.items())), "radiologists": len({r["rad_id"] for r in image_rows}),
                  "boxes": boxes, "view_filter": views},
        ))
    return finish(SOURCE, candidates, skipped)
