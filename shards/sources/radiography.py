"""COVID-19 Radiography Database (Kaggle): class folders, no CSV needed.

Layout: `COVID/images/*.png`, `Normal/images/*.png`, `Viral Pneumonia/images/*.png`,
`Lung_Opacity/images/*.png` (the 2021+ releases), or the class folders holding the images directly
(the first release, also `COVID-19/` and `NORMAL/`). The xlsx metadata files are not needed. The
database has no patient ids, so every image is its own patient group (documented limitation).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from runkit.errors import UserError
from shards.sources import IMAGE_SUFFIXES, Candidate, RawItem, Skipped, finish, require_dir

SOURCE = "radiography"
CLASS_DIAGNOSIS = {
    "COVID": "covid", "COVID-19": "covid",
    "Normal": "normal", "NORMAL": "normal",
    "Viral Pneumonia": "pneumonia",
    "Lung_Opacity": "other",
}


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    src = require_dir(src, SOURCE)
    folders = [(name, src / name) for name in sorted(CLASS_DIAGNOSIS) if (src / name).is_dir()]
    if not folders:
        raise UserError(f"{src} has none of the class folders {', '.join(sorted(set(CLASS_DIAGNOSIS)))}")
    return _iter(folders)


def _iter(folders: list[tuple[str, Path]]) -> Iterator[RawItem | Skipped]:
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for cls, folder in folders:
        image_dir = folder / "images" if (folder / "images").is_dir() else folder
        for path in sorted(image_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = f"{cls}/{path.name}"
            if path.is_symlink() or not path.is_file():
                skipped.append(Skipped(rel, "not a regular file"))
                continue
            candidates.append(Candidate(name=rel, path=path, patient_id=f"{cls}/{path.stem}",
                                        diagnosis=CLASS_DIAGNOSIS[cls], meta={"class": cls}))
    return finish(SOURCE, candidates, skipped)
