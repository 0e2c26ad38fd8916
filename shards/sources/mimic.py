"""MIMIC-CXR-JPG 2.0.0 (PhysioNet).

`--src` holds `mimic-cxr-2.0.0-metadata.csv`, `-chexpert.csv`, `-negbio.csv` and `-split.csv` (each
may be `.csv.gz`, as downloaded) and `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`, where XX is the first
two digits of the subject id.

- One image per metadata row (dicom_id). Views: `ViewPosition`; `--views frontal` keeps PA and AP
  (a blank ViewPosition is not known to be frontal and is dropped; `--views all` keeps it).
- Labels are per study, joined on (subject_id, study_id) from the chexpert file, or the negbio file
  with `--labeler negbio`; the uncertain policy applies as for CheXpert. A study without a label row
  keeps unknown labels (the image still serves pretraining). Only the chexpert/negbio file that is
  used must exist.
- Splits: the official split file (train / validate / test -> train / val / test), by dicom_id. A
  subject whose images carry different splits goes wholly to the most held-out one; an image missing
  from the split file takes its subject's split, or a subject hash if the subject has none.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from shards.sources import (
    CHEXPERT_LABELS,
    Candidate,
    RawItem,
    Skipped,
    chexpert_style_labels,
    find_csv,
    finish,
    keep_view,
    missing_fields,
    options_of,
    read_csv,
    require_dir,
    safe_file_name,
)

SOURCE = "mimic"
PREFIX = "mimic-cxr-2.0.0"
META_REQUIRED = ("dicom_id", "subject_id", "study_id", "ViewPosition")
LABEL_REQUIRED = ("subject_id", "study_id") + CHEXPERT_LABELS
SPLIT_REQUIRED = ("dicom_id", "study_id", "subject_id", "split")
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    opts = options_of(opts)
    src = require_dir(src, SOURCE)
    meta = read_csv(find_csv(src, f"{PREFIX}-metadata.csv"), META_REQUIRED)
    labels = read_csv(find_csv(src, f"{PREFIX}-{opts.labeler}.csv"), LABEL_REQUIRED)
    splits = read_csv(find_csv(src, f"{PREFIX}-split.csv"), SPLIT_REQUIRED)
    return _iter(src, meta, labels, splits, opts)


def image_path(src: Path, subject: str, study: str, dicom_id: str) -> Path:
    return src / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"


def _iter(src, meta_rows, label_rows, split_rows, opts) -> Iterator[RawItem | Skipped]:
    skipped: list[Skipped] = []
    study_labels: dict[tuple[str, str], tuple] = {}
    for row in label_rows:
        key = (row["subject_id"], row["study_id"])
        labels, findings, diagnosis, problem = chexpert_style_labels(row, opts.uncertain)
        study_labels[key] = (labels, findings, diagnosis, problem)
    split_of = {}
    for row in split_rows:
        split_of[row["dicom_id"]] = SPLIT_NAMES.get(row["split"].strip().lower())
    candidates: list[Candidate] = []
    for i, row in enumerate(meta_rows, start=2):
        name = row.get("dicom_id") or f"metadata line {i}"
        gone = missing_fields(row, ("dicom_id", "subject_id", "study_id"))
        if gone:
            skipped.append(Skipped(name, f"csv row missing fields: {', '.join(gone)}"))
            continue
        if not keep_view(row["ViewPosition"], opts):
            continue
        subject, study, dicom_id = row["subject_id"], row["study_id"], row["dicom_id"]
        if not all(safe_file_name(x) for x in (subject, study, dicom_id)) or not subject.isdigit():
            skipped.append(Skipped(name, "unsafe or malformed id"))
            continue
        labels, findings, diagnosis, problem = study_labels.get((subject, study), (None, None, None, None))
        if problem:
            skipped.append(Skipped(name, problem))
            continue
        candidates.append(Candidate(
            name=f"{dicom_id}.jpg", path=image_path(src, subject, study, dicom_id), patient_id=subject,
            view=row["ViewPosition"], diagnosis=diagnosis, findings=findings, source_labels=labels,
            split=split_of.get(dicom_id),
            meta={"study_id": study, "labeler": opts.labeler, "uncertain_policy": opts.uncertain,
                  "csv_size": _size(row)},
        ))
    return finish(SOURCE, candidates, skipped)


def _size(row: dict[str, str]) -> list[int] | None:
    try:
        return [int(row["Columns"]), int(row["Rows"])]
    except (KeyError, ValueError):
        return None
