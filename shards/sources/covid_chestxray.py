"""ieee8023 covid-chestxray-dataset: `metadata.csv` + `images/` (+ `annotations/covid-severity-scores.csv`).

Only frontal X-rays are inputs; CT, lateral and axial rows are filtered out (not reported). A frontal
X-ray row whose file is absent is reported as Skipped("<filename>", "missing file"). The same file
listed under two patient ids (rows duplicated in the 2020 snapshot) becomes one image whose patient
group is the union of both ids, so the split stays patient-disjoint.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from shards.record import SEVERITY_RANGES
from shards.sources import (
    Candidate,
    RawItem,
    Skipped,
    diagnosis_from_finding,
    finish,
    missing_fields,
    parse_age,
    read_csv,
    require_dir,
    safe_file_name,
)

SOURCE = "covid-chestxray"
CSV_NAME = "metadata.csv"
REQUIRED = ("patientid", "finding", "view", "modality", "filename")
FRONTAL_VIEWS = {"pa", "ap", "ap supine", "ap semi erect", "ap erect"}
SEVERITY_CSV = Path("annotations") / "covid-severity-scores.csv"
SEVERITY_COLUMNS = ("filename", "geographic_mean", "opacity_mean")


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    src = require_dir(src, SOURCE)
    rows = read_csv(src / CSV_NAME, REQUIRED)
    severity = load_severity(src / SEVERITY_CSV)
    return _iter(src, rows, severity)


def is_frontal_xray(row: dict[str, str]) -> bool:
    return row["modality"].lower() == "x-ray" and " ".join(row["view"].lower().split()) in FRONTAL_VIEWS


def load_severity(path: Path) -> dict[str, dict[str, float]]:
    """filename -> {geographic_mean, opacity_mean}; {} when the file does not exist.

    The file starts with `##` comment lines. Rows with values that are not numbers or lie outside
    geographic 0-8 / opacity 0-6 are ignored rather than trusted.
    """
    if not path.is_file():
        return {}
    out: dict[str, dict[str, float]] = {}
    for row in read_csv(path, SEVERITY_COLUMNS, comment_prefix="##"):
        try:
            score = {c: float(row[c]) for c in SEVERITY_COLUMNS[1:]}
        except ValueError:
            continue
        if all(math.isfinite(v) and SEVERITY_RANGES[c][0] <= v <= SEVERITY_RANGES[c][1] for c, v in score.items()):
            out.setdefault(row["filename"], score)
    return out


def _iter(src: Path, rows: list[dict[str, str]], severity: dict) -> Iterator[RawItem | Skipped]:
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        name = row["filename"] or f"{CSV_NAME} line {i}"
        unclassified = missing_fields(row, ("modality", "view"))
        if unclassified:  # cannot tell whether it is a frontal X-ray: report it unless it is clearly not one
            if row["modality"].lower() in ("", "x-ray"):
                skipped.append(Skipped(name, f"csv row missing fields: {', '.join(unclassified)}"))
            continue
        if not is_frontal_xray(row):
            continue  # CT, lateral, axial: not inputs, not skips
        gone = missing_fields(row, ("patientid", "filename"))
        if gone:
            skipped.append(Skipped(name, f"csv row missing fields: {', '.join(gone)}"))
            continue
        if not safe_file_name(row["filename"]):
            skipped.append(Skipped(name, "unsafe file name"))
            continue
        folder = row.get("folder") or "images"
        if not safe_file_name(folder):
            skipped.append(Skipped(name, "unsafe folder name"))
            continue
        candidates.append(Candidate(
            name=row["filename"], path=src / folder / row["filename"], patient_id=row["patientid"],
            view=row["view"], diagnosis=diagnosis_from_finding(row["finding"]),
            severity=severity.get(row["filename"]),
            meta={"finding": row["finding"], "age": parse_age(row.get("age")), "sex": row.get("sex", ""),
                  "offset": row.get("offset", "")},
        ))
    return finish(SOURCE, candidates, skipped)
