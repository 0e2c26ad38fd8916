"""`folder`: any tree of images (PNG, JPEG, TIFF, ... and DICOM), for unlabelled pretraining data.

Every regular file under `--src` whose suffix is an image or DICOM suffix (`IMAGE_SUFFIXES`,
`.dcm`, `.dicom`) is one image; hidden files and folders and symlinks are not followed (a symlink
is reported). The name of an image is its path relative to `--src`.

An optional labels CSV (`<src>/labels.csv`, or `--labels FILE`) adds labels. Its `path` column
(required) names the image relative to `--src`; optional columns: `patient_id`, `view`, `split`
(train / val / test), `diagnosis` (covid / pneumonia / normal / other), `findings` (NIH-14 names
separated by `|`, `No Finding` for none). Any other column is kept in `labels.source_labels` when its
value is 0 or 1, else in `meta.csv`. A CSV row whose file is absent is a "missing file" skip; an
image without a row is unlabelled. Without a patient id each image is its own patient; without a
split a hash of the patient id decides it. `--views frontal` drops only images whose CSV `view` is
a known non-frontal one (unlabelled trees keep everything; DICOM files with a lateral
ViewPosition are dropped at build time).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from runkit.errors import UserError
from shards.record import DIAGNOSES, NIH_FINDINGS
from shards.sources import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    Candidate,
    RawItem,
    Skipped,
    finish,
    is_frontal,
    options_of,
    read_csv,
    require_dir,
)

SOURCE = "folder"
LABELS_CSV = "labels.csv"
KNOWN_COLUMNS = ("path", "patient_id", "view", "split", "diagnosis", "findings")
SPLITS = ("train", "val", "test")


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    opts = options_of(opts)
    src = require_dir(src, SOURCE)
    csv_path = Path(opts.labels_csv) if opts.labels_csv else src / LABELS_CSV
    if opts.labels_csv and not csv_path.is_file():
        raise UserError(f"--labels {csv_path}: no such file")
    rows = read_csv(csv_path, ("path",)) if csv_path.is_file() else []
    files, skipped = walk(src, exclude=csv_path)
    return _iter(src, files, rows, skipped, opts)


def walk(src: Path, exclude: Path | None = None) -> tuple[list[str], list[Skipped]]:
    """Relative POSIX paths of every image file under src (sorted), and the symlinks met (skipped)."""
    suffixes = set(IMAGE_SUFFIXES) | set(DICOM_SUFFIXES)
    found: list[str] = []
    skipped: list[Skipped] = []
    stack = [src]
    while stack:
        folder = stack.pop()
        for p in sorted(folder.iterdir()):
            if p.name.startswith("."):
                continue
            rel = p.relative_to(src).as_posix()
            if p.is_symlink():
                if p.suffix.lower() in suffixes or p.is_dir():
                    skipped.append(Skipped(rel, "symlink"))
                continue
            if p.is_dir():
                stack.append(p)
            elif p.is_file() and p.suffix.lower() in suffixes and p != exclude:
                found.append(rel)
    return sorted(found), skipped


def _row_labels(row: dict[str, str]) -> tuple[dict, str | None]:
    """Labels of one CSV row -> (fields for Candidate, problem)."""
    out: dict = {}
    diagnosis = row.get("diagnosis", "").strip().lower()
    if diagnosis:
        if diagnosis not in DIAGNOSES:
            return {}, f"unknown diagnosis {diagnosis!r}"
        out["diagnosis"] = diagnosis
    findings = row.get("findings", "").strip()
    if findings:
        names = sorted({t.strip() for t in findings.split("|") if t.strip() and t.strip() != "No Finding"})
        unknown = [n for n in names if n not in NIH_FINDINGS]
        if unknown:
            return {}, f"unknown finding: {', '.join(unknown)}"
        out["findings"] = names
    split = row.get("split", "").strip().lower()
    if split:
        if split not in SPLITS:
            return {}, f"unknown split {split!r}"
        out["split"] = split
    own, extra = {}, {}
    for k, v in row.items():
        if k in KNOWN_COLUMNS or not v:
            continue
        if v in ("0", "1", "0.0", "1.0"):
            own[k] = int(float(v))
        else:
            extra[k] = v
    if own:
        out["source_labels"] = own
    if extra:
        out["csv"] = extra
    return out, None


def _iter(src: Path, files: list[str], rows, skipped: list[Skipped], opts) -> Iterator[RawItem | Skipped]:
    present = set(files)
    labelled: dict[str, dict[str, str]] = {}
    for i, row in enumerate(rows, start=2):
        rel = PurePosixPath(row["path"].replace("\\", "/")).as_posix() if row["path"] else ""
        if not rel:
            skipped.append(Skipped(f"{LABELS_CSV} line {i}", "csv row missing fields: path"))
            continue
        if ".." in PurePosixPath(rel).parts:
            skipped.append(Skipped(rel, "unsafe path (..)"))
            continue
        if rel in labelled:
            skipped.append(Skipped(rel, "duplicate csv row"))
            continue
        labelled[rel] = row
        if rel not in present:
            skipped.append(Skipped(rel, "missing file"))
    candidates: list[Candidate] = []
    for rel in files:
        row = labelled.get(rel, {})
        fields, problem = _row_labels(row) if row else ({}, None)
        if problem:
            skipped.append(Skipped(rel, problem))
            continue
        view = row.get("view", "").strip()
        if opts.views == "frontal" and view and not is_frontal(view):
            continue
        meta = {"view_filter": opts.views}
        if "csv" in fields:
            meta["csv"] = fields.pop("csv")
        candidates.append(Candidate(
            name=rel, path=src / rel, patient_id=row.get("patient_id", "").strip() or rel, view=view,
            diagnosis=fields.get("diagnosis"), findings=fields.get("findings"),
            source_labels=fields.get("source_labels"), split=fields.get("split"), meta=meta))
    return finish(SOURCE, candidates, skipped)
