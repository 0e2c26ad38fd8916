"""One small module per raw data set format; each turns a source folder into `RawItem`s and `Skipped`s.

Every module exposes `scan(src, opts: ScanOptions | None = None) -> Iterator[RawItem | Skipped]`. `scan` validates the folder and the
CSV header eagerly (a `UserError` naming the problem, before any work), then yields `Skipped`
entries (sorted by name) followed by `RawItem`s sorted by key. Splits are assigned here, from the
whole CSV, so they never depend on `--part` or on which files are present. Images are not decoded:
`RawItem.read()` returns the original bytes, and `shards.preprocess` turns them into pixels.

This module also holds the machinery the CSV-based COVID sources share (reading CSVs, mapping
free-text findings to a diagnosis, keys, patient groups, split assignment).
"""
from __future__ import annotations

import csv
import functools
import gzip
import importlib
import io
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from runkit.errors import UserError
from shards.record import Record, make_key
from shards.splits import PatientGroups, patient_split

SOURCE_NAMES = ("nih", "covid-chestxray", "actualmed", "figure1", "radiography",
                "chexpert", "mimic", "padchest", "vindr", "rsna", "folder")
_MODULES = {
    "nih": "shards.sources.nih",
    "covid-chestxray": "shards.sources.covid_chestxray",
    "actualmed": "shards.sources.actualmed",
    "figure1": "shards.sources.figure1",
    "radiography": "shards.sources.radiography",
    "chexpert": "shards.sources.chexpert",
    "mimic": "shards.sources.mimic",
    "padchest": "shards.sources.padchest",
    "vindr": "shards.sources.vindr",
    "rsna": "shards.sources.rsna",
    "folder": "shards.sources.folder",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
DICOM_SUFFIXES = (".dcm", ".dicom")
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
VIEW_FILTERS = ("frontal", "all")
LABELERS = ("chexpert", "negbio")


@dataclass(frozen=True)
class ScanOptions:
    """Choices a user makes per build (`python -m shards build` flags); sources ignore what they do not use.

    uncertain: CheXpert-style -1 labels (CheXpert, MIMIC): 'ignore' -> unknown (None, not a positive,
      not a negative: a loss should mask it), 'ones' -> 1 (U-Ones), 'zeros' -> 0 (U-Zeros).
    views: 'frontal' keeps PA/AP images only (the default); 'all' keeps laterals too.
    labeler: which MIMIC-CXR label file to read (mimic-cxr-2.0.0-chexpert.csv or -negbio.csv).
    labels_csv: for `folder`, a CSV of labels (default: <src>/labels.csv when it exists).
    """

    uncertain: str = "ignore"
    views: str = "frontal"
    labeler: str = "chexpert"
    labels_csv: str | None = None

    def __post_init__(self):
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise UserError(f"uncertain-label policy {self.uncertain!r}: want one of {', '.join(UNCERTAIN_POLICIES)}")
        if self.views not in VIEW_FILTERS:
            raise UserError(f"view filter {self.views!r}: want one of {', '.join(VIEW_FILTERS)}")
        if self.labeler not in LABELERS:
            raise UserError(f"MIMIC labeler {self.labeler!r}: want one of {', '.join(LABELERS)}")

    def as_dict(self) -> dict:
        return {"uncertain": self.uncertain, "views": self.views, "labeler": self.labeler,
                "labels_csv": self.labels_csv}


def get_source(name: str) -> ModuleType:
    """The module for a source name; a UserError lists the known names."""
    if name not in _MODULES:
        raise UserError(f"unknown source {name!r}; known sources: {', '.join(SOURCE_NAMES)}")
    return importlib.import_module(_MODULES[name])


@dataclass(frozen=True)
class RawItem:
    """One input image, not yet decoded. `read` is picklable (a functools.partial of a module function)."""

    record: Record                 # image=None, split assigned, meta["path"] = original path
    read: Callable[[], bytes]      # the original file bytes; may raise OSError


@dataclass(frozen=True)
class Skipped:
    """An input that was referenced but cannot be used, with a short reason for the manifest."""

    name: str
    reason: str


# ----------------------------------------------------------------------------- files and CSVs

def read_file(path: str) -> bytes:
    """Read a whole file (module-level so that `functools.partial(read_file, path)` pickles)."""
    with open(path, "rb") as f:
        return f.read()


def file_reader(path: Path) -> Callable[[], bytes]:
    return functools.partial(read_file, str(path))


def require_dir(src: Path | str, what: str) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{what} source folder not found: {src}")
    return src


def read_csv(path: Path, required: Sequence[str], encodings: Sequence[str] = ("utf-8-sig", "latin-1"),
             comment_prefix: str | None = None) -> list[dict[str, str]]:
    """Rows of a CSV as dicts with stripped header names and stripped values.

    Fails at once with a UserError when the file is missing or lacks required columns (naming them).
    Tries each encoding in turn: the Figure1 CSV is latin-1, the others UTF-8.
    """
    if not path.is_file():
        raise UserError(f"CSV not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise UserError(f"cannot decompress {path}: {exc}") from None
    text = None
    for enc in encodings:
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    if text is None:
        raise UserError(f"cannot decode {path} as any of {', '.join(encodings)}")
    lines = text.splitlines(keepends=True)
    if comment_prefix:
        lines = [ln for ln in lines if not ln.lstrip().startswith(comment_prefix)]
    reader = csv.reader(io.StringIO("".join(lines)))
    header = next(reader, None)
    if not header:
        raise UserError(f"CSV {path} is empty")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"CSV {path} lacks required column(s): {', '.join(missing)}")
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue  # blank line
        row = {h: v.strip() for h, v in zip(header, values) if h}
        for h in header[len(values):]:
            if h:
                row.setdefault(h, "")
        rows.append(row)
    return rows


def find_csv(src: Path, name: str, required: bool = True) -> Path | None:
    """`<src>/<name>` or `<src>/<name>.gz` (MIMIC and PadChest ship both); a UserError when required and absent."""
    for p in (src / name, src / f"{name}.gz"):
        if p.is_file():
            return p
    if required:
        raise UserError(f"{src} has neither {name} nor {name}.gz")
    return None


def missing_fields(row: dict[str, str], fields: Iterable[str]) -> list[str]:
    return [f for f in fields if not row.get(f, "").strip()]


def parse_age(text: str | None) -> int | None:
    """'58', '058Y', '58.0' -> 58; anything else -> None."""
    m = re.match(r"\s*(\d{1,3})(?:\.\d*)?\s*[YyA-Za-z]?\s*$", text or "")
    return int(m.group(1)) if m else None


def safe_file_name(name: str) -> bool:
    """A CSV-given file name must stay inside its folder: no separators, no '..', no NUL."""
    return bool(name) and "/" not in name and "\\" not in name and "\0" not in name and name not in (".", "..")


# ----------------------------------------------------------------------------- labels

_UNKNOWN_FINDINGS = {"", "todo", "unknown", "n/a", "na", "inconclusive", "none"}
_NORMAL_FINDINGS = {"no finding", "no findings", "normal"}
_PNEUMONIA_WORDS = (
    "pneumonia", "viral", "bacterial", "fungal", "sars", "mers", "pneumocystis", "streptococcus",
    "klebsiella", "mycoplasma", "legionella", "varicella", "e.coli", "e. coli", "chlamydophila",
    "influenza", "h1n1", "staphylococcus", "mrsa", "nocardia", "aspergillosis", "herpes", "lipoid",
    "aspiration", "pseudomonas", "candida", "histoplasmosis",
)


def diagnosis_from_finding(finding: str | None) -> str | None:
    """Map a free-text or hierarchical finding to covid / pneumonia / normal / other (None = unknown).

    Handles the flat names of the 2020 snapshot ("COVID-19", "Streptococcus", "COVID-19, ARDS") and
    the later hierarchical ones ("Pneumonia/Viral/COVID-19", "Pneumonia/Bacterial/Streptococcus").
    "todo", "Unknown" and blanks ("Inconclusive" in Actualmed) are unknown, not "other".
    """
    text = (finding or "").strip().lower()
    if text in _UNKNOWN_FINDINGS:
        return None
    tokens = [t.strip() for t in re.split(r"[/,;|]+", text) if t.strip()]
    if any("covid" in t or "sars-cov-2" in t or "sars-cov2" in t for t in tokens):
        return "covid"
    if tokens and all(t in _NORMAL_FINDINGS for t in tokens):
        return "normal"
    if any(w in t for t in tokens for w in _PNEUMONIA_WORDS):
        return "pneumonia"
    return "other"


# ----------------------------------------------------------------------------- items

@dataclass
class Candidate:
    """A referenced image before keys and splits: what a CSV source module produces per kept row."""

    name: str                       # file name as referenced (Skipped name, key stem, dedupe id)
    path: Path                      # where the file should be
    patient_id: str
    view: str = ""
    diagnosis: str | None = None
    findings: list[str] | None = None
    severity: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source_labels: dict[str, int | None] | None = None
    split: str | None = None        # the official split, where the data set has one; else a patient hash
    reader: Callable[[], bytes] | None = None  # default: read `path`


def assign_keys(source: str, names: Iterable[str]) -> dict[str, str]:
    """name -> unique key. Collisions (a.png / a.jpg, 'a b' / 'a_b') get _2, _3... in sorted name order."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for name in sorted(set(names)):
        stem = name.rsplit(".", 1)[0] if "." in name else name
        base = make_key(source, stem)
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys[name] = key
    return keys


def finish(source: str, candidates: list[Candidate], skipped: list[Skipped],
           groups: PatientGroups | None = None) -> Iterator[RawItem | Skipped]:
    """Dedupe candidates by name (first wins, patients merged), drop absent files as Skipped
    ("missing file"), assign keys and patient-grouped splits, and yield in deterministic order.

    Splits use every candidate, present or not, so they do not depend on which files are present.
    """
    groups = groups or PatientGroups()
    by_name: dict[str, Candidate] = {}
    aliases: dict[str, set[str]] = {}
    for c in candidates:
        groups.add(c.patient_id)
        if c.name in by_name:
            groups.union(by_name[c.name].patient_id, c.patient_id)
            aliases[c.name].add(c.patient_id)
        else:
            by_name[c.name] = c
            aliases[c.name] = {c.patient_id}
    keys = assign_keys(source, by_name)
    official: dict[str, str] = {}  # patient group -> official split; the most held-out one wins on conflict
    for c in by_name.values():
        if c.split:
            g = groups.find(c.patient_id)
            if _HELD_OUT.get(c.split, 0) >= _HELD_OUT.get(official.get(g, ""), -1):
                official[g] = c.split
    items: list[RawItem] = []
    for name, c in by_name.items():
        if not c.path.is_file():
            skipped.append(Skipped(name, "missing file"))
            continue
        meta = {"path": str(c.path), **c.meta}
        if len(aliases[name]) > 1:
            meta["patient_ids"] = sorted(aliases[name])
        group = groups.find(c.patient_id)
        rec = Record(key=keys[name], image=None, source=source, patient_id=group, view=c.view,
                     split=official.get(group) or patient_split(source, group), diagnosis=c.diagnosis,
                     findings=c.findings, severity=c.severity, source_labels=c.source_labels, meta=meta)
        items.append(RawItem(rec, c.reader or file_reader(c.path)))
    yield from sorted(skipped, key=lambda s: (s.name, s.reason))
    yield from sorted(items, key=lambda it: it.record.key)


_HELD_OUT = {"train": 0, "val": 1, "test": 2}


NON_FRONTAL_VIEWS = {"l", "lateral", "ll", "rl", "axial", "coronal"}


def keep_row(row: dict[str, str]) -> bool:
    """X-ray and not a known non-frontal view; a blank view or modality is kept (these sets are frontal)."""
    modality = row.get("modality", "").lower()
    view = " ".join(row.get("view", "").lower().split())
    return modality in ("", "x-ray") and view not in NON_FRONTAL_VIEWS


def csv_source_items(source: str, src: Path, rows: list[dict[str, str]], name_of, name_field: str,
                     patient_of=lambda r: r["patientid"], locate=None) -> Iterator[RawItem | Skipped]:
    """The Actualmed / Figure1 layout: one CSV row per image in `images/`; `locate` finds the file when
    the CSV names no file."""
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for i, row in enumerate(rows, start=2):
        if not keep_row(row):
            continue
        name = name_of(row) or f"metadata.csv line {i}"
        gone = missing_fields(row, ("patientid", name_field))
        if gone:
            skipped.append(Skipped(name, f"csv row missing fields: {', '.join(gone)}"))
            continue
        if not safe_file_name(name):
            skipped.append(Skipped(name, "unsafe file name"))
            continue
        path = locate(src, name) if locate else src / "images" / name
        candidates.append(Candidate(
            name=path.name if locate else name, path=path, patient_id=patient_of(row), view=row.get("view", ""),
            diagnosis=diagnosis_from_finding(row.get("finding")),
            meta={"finding": row.get("finding", ""), "age": parse_age(row.get("age")), "sex": row.get("sex", ""),
                  "offset": row.get("offset", "")},
        ))
    return finish(source, candidates, skipped)


# ----------------------------------------------------------------------------- views and CheXpert-style labels

FRONTAL_POSITIONS = {"PA", "AP", "AP_HORIZONTAL", "AP HORIZONTAL", "AP SUPINE", "AP AXIAL", "PA LLD", "AP LLD",
                     "AP RLD", "PA RLD"}


def is_frontal(view: str) -> bool:
    """A PA/AP projection (any spelling the big sets use); laterals, blanks and unknowns are not frontal."""
    return " ".join(view.upper().replace("-", " ").split()) in FRONTAL_POSITIONS


def keep_view(view: str, opts: ScanOptions) -> bool:
    return opts.views == "all" or is_frontal(view)


# CheXpert's 14 observations (also MIMIC-CXR's chexpert/negbio files), and those that mean an NIH-14 finding.
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
CHEXPERT_TO_NIH = {"Cardiomegaly": "Cardiomegaly", "Edema": "Edema", "Consolidation": "Consolidation",
                   "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax",
                   "Pleural Effusion": "Effusion"}


def uncertain_value(text: str, policy: str) -> int | None | str:
    """'1.0' -> 1, '0.0' -> 0, '' -> None, '-1.0' -> the policy (None, 1 or 0); anything else -> 'bad'."""
    t = text.strip()
    if t == "" or t.lower() == "nan":
        return None
    try:
        v = float(t)
    except ValueError:
        return "bad"
    if v == 1:
        return 1
    if v == 0:
        return 0
    if v == -1:
        return {"ignore": None, "ones": 1, "zeros": 0}[policy]
    return "bad"


def chexpert_style_labels(row: dict[str, str], policy: str) -> tuple[dict | None, list[str] | None, str | None, str | None]:
    """(source_labels, NIH findings, diagnosis, problem) from the 14 CheXpert columns of one row.

    findings: the NIH-14 names whose CheXpert observation is 1 after the uncertain policy; [] only when
    none is and No Finding is 1; None (unknown) when none is and No Finding is not 1 (CheXpert does not
    label Mass, Nodule, ... so their absence means 'not labelled' in any case). diagnosis:
    pneumonia when Pneumonia is 1, normal when No Finding is 1, other when any other observation is
    1, else None (unknown).
    """
    labels: dict[str, int | None] = {}
    for name in CHEXPERT_LABELS:
        v = uncertain_value(row.get(name, ""), policy)
        if v == "bad":
            return None, None, None, f"bad label value {row.get(name)!r} in column {name!r}"
        labels[name] = v
    findings = sorted({CHEXPERT_TO_NIH[n] for n, v in labels.items() if v == 1 and n in CHEXPERT_TO_NIH})
    if not findings and labels["No Finding"] != 1:
        findings = None  # no NIH-14 positive, but not said to be normal either: unknown, not "No Finding"
    if labels["Pneumonia"] == 1:
        diagnosis = "pneumonia"
    elif labels["No Finding"] == 1:
        diagnosis = "normal"
    elif any(v == 1 for n, v in labels.items() if n != "No Finding"):
        diagnosis = "other"
    else:
        diagnosis = None
    return labels, findings, diagnosis, None


def options_of(opts: ScanOptions | None) -> ScanOptions:
    return opts if opts is not None else ScanOptions()
