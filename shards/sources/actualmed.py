"""Actualmed COVID-chestxray-dataset: `metadata.csv` (with an `imagename` column) + `images/`.

Most referenced files (16-bit PNGs upstream) are absent from public copies: each is reported as
Skipped("<imagename>", "missing file"). A blank finding ("Inconclusive" in the notes) is an unknown
diagnosis (None), not a skip: the image still serves pretraining.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from shards.sources import RawItem, Skipped, csv_source_items, read_csv, require_dir

SOURCE = "actualmed"
CSV_NAME = "metadata.csv"
REQUIRED = ("patientid", "finding", "imagename")


def scan(src: Path | str, opts=None) -> Iterator[RawItem | Skipped]:
    src = require_dir(src, SOURCE)
    rows = read_csv(src / CSV_NAME, REQUIRED)
    return csv_source_items(SOURCE, src, rows, name_of=lambda r: r["imagename"], name_field="imagename")

