"""CheXpert (Stanford), the v1.0 and the downsampled v1.0-small layouts.

`--src` is the data-set folder (`CheXpert-v1.0-small/` or `CheXpert-v1.0/`, holding `train.csv`,
`valid.csv`, `train/`, `valid/`) or the folder above it. CSV columns: Path, Sex, Age,
Frontal/Lateral, AP/PA, then the 14 observations (`shards.sources.CHEXPERT_LABELS`), each 1.0, 0.0,
-1.0 (uncertain) or blank. Paths in the CSV start with the data-set folder name
(`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`); they are resolved relative to
the folder above `train.csv`, whatever that folder is called.

- Labels: the uncertain policy (`--uncertain ignore|ones|zeros`, see `ScanOptions`) turns -1 into
  None / 1 / 0; blank is None. All 14 go to `labels.source_labels`; the 7 with an NIH-14 meaning go to
  `findings` (`CHEXPERT_TO_NIH`).
- Views: `--views frontal` (default) keeps `Frontal/Lateral == Frontal`; the view is the AP/PA value.
- Splits: `valid.csv` is `val` (the official validation set, 200 studies); `train.csv` is `train`.
  Patients come from the `patientNNNNN` path component; a patient in both files goes to `val`.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from runkit.errors import UserError
from shards.sources import (
    CHEXPERT_LABELS,
    Candidate,
    RawItem,
    Skipped,
    chexpert_style_labels,
    finish,
    missing_fields,
    options_of,
    parse_age,
    read_csv,
    require_dir,
)

SOURCE = "chexpert"
CSV_SPLITS = (("train.csv", "train"), ("valid.csv", "val"))
REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + CHEXPERT_LABELS
_PATIENT = re.compile(r"^patient(\d+)$")


def dataset_root(src: Path) -> Path:
    """The folder holding train.csv: src itself, or one CheXpert-v1.0* folder inside it."""
    if (src / "train.csv").is_file() or (src / "valid.csv").is_file():
        return src
    inner = sorted(p for p in src.glob("CheXpert-v1.0*") if p.is_dir() and (p / "train.csv").is_file())
    if inner:
        return inner[0]
    raise UserError(f"no CheXpert train.csv or valid.csv in {src} (nor in a CheXpert-v1.0*/ folder inside it)")


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    opts = options_of(opts)
    root = dataset_root(require_dir(src, SOURCE))
    tables = [(name, split, read_csv(root / name, REQUIRED)) for name, split in CSV_SPLITS if (root / name).is_file()]
    return _iter(root, tables, opts)


def resolve(root: Path, csv_path: str) -> tuple[Path | None, str]:
    """CSV path -> (file, name relative to the data-set folder); (None, reason) when it is unsafe."""
    parts = PurePosixPath(csv_path.replace("\\", "/")).parts
    if ".." in parts or (parts and parts[0] == "/"):
        return None, "unsafe path (..)"
    if parts and parts[0].startswith("CheXpert"):
        parts = parts[1:]
    if not parts:
        return None, "empty path"
    rel = "/".join(parts)
    return root / rel, rel


def _iter(root: Path, tables, opts) -> Iterator[RawItem | Skipped]:
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for csv_name, split, rows in tables:
        for i, row in enumerate(rows, start=2):
            name = row.get("Path") or f"{csv_name} line {i}"
            gone = missing_fields(row, ("Path", "Frontal/Lateral"))
            if gone:
                skipped.append(Skipped(name, f"csv row missing fields: {', '.join(gone)}"))
                continue
            frontal = row["Frontal/Lateral"].strip().lower() == "frontal"
            view = row.get("AP/PA", "").strip() if frontal else "LATERAL"
            if opts.views == "frontal" and not frontal:
                continue
            path, rel = resolve(root, row["Path"])
            if path is None:
                skipped.append(Skipped(name, rel))
                continue
            pid = next((p for p in PurePosixPath(rel).parts if _PATIENT.match(p)), None)
            if pid is None:
                skipped.append(Skipped(name, "no patientNNNNN folder in path"))
                continue
            labels, findings, diagnosis, problem = chexpert_style_labels(row, opts.uncertain)
            if problem:
                skipped.append(Skipped(name, problem))
                continue
            candidates.append(Candidate(
                name=rel, path=path, patient_id=pid, view=view, diagnosis=diagnosis, findings=findings,
                source_labels=labels, split=split,
                meta={"age": parse_age(row.get("Age")), "sex": row.get("Sex", ""), "csv": csv_name,
                      "uncertain_policy": opts.uncertain},
            ))
    return finish(SOURCE, candidates, skipped)
