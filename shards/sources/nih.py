"""NIH ChestX-ray14: `Data_Entry_2017_v2020.csv` (or the older `Data_Entry_2017.csv`), the official
`train_val_list.txt` / `test_list.txt`, and the images in any of three layouts:

- a flat `images/` folder;
- Kaggle's `images_0XX/images/` subfolders;
- the 12 official `images_0XX.tar.gz` archives, read in place through `shards.safe_tar` (never
  extracted; indexing them is one sequential decompression pass, ~45 GB, at scan time).

When an image is in several layouts the first one above wins. Splits: `test` from test_list.txt;
train_val is split into `train` and `val`, where val is whole patients drawn deterministically
(`shards.splits.draw_val_patients`) to 1,000 images for the full set (a proportional share for
smaller sets), from the CSV alone so the draw never depends on which files are present or on --part.
"""
from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from runkit.errors import UserError
from shards.record import NIH_FINDINGS, Record
from shards.safe_tar import TarEntry, read_member, scan_tar
from shards.sources import (
    RawItem,
    Skipped,
    assign_keys,
    file_reader,
    missing_fields,
    parse_age,
    read_csv,
    require_dir,
)
from shards.splits import draw_val_patients, nih_val_target

SOURCE = "nih"
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
ARCHIVE_PATTERNS = ("*.tar.gz", "*.tgz", "*.tar")
_FINDINGS = frozenset(NIH_FINDINGS)


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    src = require_dir(src, SOURCE)
    csv_path = next((src / n for n in CSV_NAMES if (src / n).is_file()), None)
    if csv_path is None:
        raise UserError(f"no NIH CSV in {src}: expected {' or '.join(CSV_NAMES)}")
    rows = read_csv(csv_path, REQUIRED)
    train_val = read_list(src / TRAIN_VAL_LIST)
    test = read_list(src / TEST_LIST)
    index, skipped = index_images(src, {r["Image Index"] for r in rows})
    return _iter(rows, train_val, test, index, skipped)


def read_list(path: Path) -> set[str]:
    if not path.is_file():
        raise UserError(f"NIH split list not found: {path} (both {TRAIN_VAL_LIST} and {TEST_LIST} are needed)")
    return {ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()}


def findings_of(labels: str) -> tuple[list[str] | None, str | None]:
    """'Effusion|Pneumonia' -> (['Effusion', 'Pneumonia'], None); 'No Finding' -> ([], None);
    an unknown label -> (None, reason)."""
    names = [t.strip() for t in labels.split("|") if t.strip()]
    names = [n for n in names if n != "No Finding"]
    unknown = sorted(set(names) - _FINDINGS)
    if unknown:
        return None, f"unknown finding: {', '.join(unknown)}"
    return sorted(set(names)), None


def diagnosis_of(findings: list[str]) -> str:
    if not findings:
        return "normal"
    return "pneumonia" if "Pneumonia" in findings else "other"


def index_images(src: Path, wanted: set[str]) -> tuple[dict[str, tuple[str, object]], list[Skipped]]:
    """name -> (original path for meta, reader) over the three layouts; plus unsafe archive members."""
    index: dict[str, tuple[str, object]] = {}
    folders = [src / "images"] + sorted(p / "images" for p in src.glob("images_*") if p.is_dir())
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.name in wanted and p.name not in index and p.is_file() and not p.is_symlink():
                index[p.name] = (str(p), file_reader(p))
    skipped: list[Skipped] = []
    archives = sorted({p for pat in ARCHIVE_PATTERNS for p in src.glob(pat) if p.is_file()})
    for archive in tqdm(archives, desc="indexing NIH archives", unit="archive", disable=len(archives) < 2):
        for entry in scan_tar(archive):
            if isinstance(entry, Skipped):
                skipped.append(entry)
                continue
            assert isinstance(entry, TarEntry)
            name = entry.name.rsplit("/", 1)[-1]
            if name in wanted and name not in index:
                reader = functools.partial(read_member, str(archive), entry.offset_data, entry.size)
                index[name] = (f"{archive}:{entry.name}", reader)
    if not archives and not any(f.is_dir() for f in folders):
        raise UserError(f"no NIH images in {src}: expected images/, images_0XX/images/ or images_0XX.tar.gz")
    return index, skipped


def _csv_pair(row: dict[str, str], single: str, first: str, second: str) -> list[float] | None:
    """The 2017 CSV splits 'OriginalImage[Width,Height]' into two columns; v2020 may quote it as one."""
    try:
        if row.get(first, "") and row.get(second, ""):
            return [float(row[first]), float(row[second])]
        if "," in row.get(single, ""):
            a, b = row[single].split(",", 1)
            return [float(a), float(b)]
    except ValueError:
        pass
    return None


def _iter(rows, train_val, test, index, skipped) -> Iterator[RawItem | Skipped]:
    kept: dict[str, tuple[dict[str, str], list[str], str]] = {}  # name -> (row, findings, list split)
    for i, row in enumerate(rows, start=2):
        name = row.get("Image Index", "") or f"CSV line {i}"
        gone = missing_fields(row, REQUIRED)
        if gone:
            skipped.append(Skipped(name, f"csv row missing fields: {', '.join(gone)}"))
            continue
        if name in kept:
            skipped.append(Skipped(name, "duplicate csv row"))
            continue
        findings, problem = findings_of(row["Finding Labels"])
        if problem:
            skipped.append(Skipped(name, problem))
            continue
        if name in test:
            split = "test"
        elif name in train_val:
            split = "train"
        else:
            skipped.append(Skipped(name, f"in neither {TRAIN_VAL_LIST} nor {TEST_LIST}"))
            continue
        kept[name] = (row, findings, split)

    test_patients = {row["Patient ID"] for row, _, split in kept.values() if split == "test"}
    per_patient = Counter(row["Patient ID"] for row, _, split in kept.values() if split == "train")
    candidates = {p: n for p, n in per_patient.items() if p not in test_patients}
    val_patients = draw_val_patients(candidates, nih_val_target(sum(per_patient.values())), SOURCE)

    keys = assign_keys(SOURCE, kept)
    items = []
    for name, (row, findings, split) in kept.items():
        if name not in index:
            skipped.append(Skipped(name, "missing file"))
            continue
        path, reader = index[name]
        pid = row["Patient ID"]
        meta = {"path": path, "age": parse_age(row.get("Patient Age")), "sex": row.get("Patient Gender", ""),
                "follow_up": row.get("Follow-up #", "")}
        size = _csv_pair(row, "OriginalImage[Width,Height]", "OriginalImage[Width", "Height]")
        if size:
            meta["csv_size"] = [int(v) for v in size]
        spacing = _csv_pair(row, "OriginalImagePixelSpacing[x,y]", "OriginalImagePixelSpacing[x", "y]")
        if spacing:
            meta["pixel_spacing"] = spacing
        rec = Record(key=keys[name], image=None, source=SOURCE, patient_id=pid, view=row.get("View Position", ""),
                     split="val" if split == "train" and pid in val_patients else split,
                     diagnosis=diagnosis_of(findings), findings=findings, meta=meta)
        items.append(RawItem(rec, reader))
    yield from sorted(skipped, key=lambda s: (s.name, s.reason))
    yield from sorted(items, key=lambda it: it.record.key)
