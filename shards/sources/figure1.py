"""Figure1 COVID-chestxray-dataset: latin-1 `metadata.csv` without a file name column.

Images are `images/<patientid>.jpg` or `.png` (or .jpeg). Ids such as COVID-00003a / COVID-00003b are
two images of one patient, so the patient id drops that letter and both land in one split.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from shards.sources import RawItem, Skipped, csv_source_items, read_csv, require_dir

SOURCE = "figure1"
CSV_NAME = "metadata.csv"
REQUIRED = ("patientid", "finding")
EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
_IMAGE_SUFFIX = re.compile(r"^(.*\d)[a-z]$")


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    src = require_dir(src, SOURCE)
    rows = read_csv(src / CSV_NAME, REQUIRED, encodings=("utf-8-sig", "latin-1"))
    return csv_source_items(SOURCE, src, rows, name_of=lambda r: r["patientid"], name_field="patientid",
                            patient_of=lambda r: patient_of(r["patientid"]), locate=locate)


def patient_of(image_id: str) -> str:
    """COVID-00003b -> COVID-00003 (several images of one patient); other ids unchanged."""
    m = _IMAGE_SUFFIX.match(image_id)
    return m.group(1) if m else image_id


def locate(src: Path, image_id: str) -> Path:
    """The first existing images/<id><ext>; the .jpg path when none exists (reported as missing)."""
    for ext in EXTENSIONS:
        p = src / "images" / f"{image_id}{ext}"
        if p.is_file():
            return p
    return src / "images" / f"{image_id}.jpg"
