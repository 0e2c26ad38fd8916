"""One schema for every source, so a new data set is one small module in `shards.sources`.

A shard sample is `<key>.png` (8-bit grayscale) plus `<key>.json` (everything else), plain
WebDataset, so any webdataset user can read the shards without this package.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DIAGNOSES = ("covid", "pneumonia", "normal", "other")
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
SPLITS = ("train", "val", "test")
SEVERITY_RANGES = {"geographic_mean": (0.0, 8.0), "opacity_mean": (0.0, 6.0)}

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


def make_key(source: str, name: str) -> str:
    """A WebDataset key: unique per source and free of '.', which webdataset treats as an extension."""
    stem = _BAD_KEY_CHARS.sub("_", name)
    return f"{source}_{stem}"


@dataclass
class Record:
    key: str
    image: np.ndarray | None  # uint8 HxW (uint16 with --bit-depth 16); None until preprocessed
    source: str
    patient_id: str
    view: str = ""
    split: str = ""
    diagnosis: str | None = None          # one of DIAGNOSES, or None when unknown
    findings: list[str] | None = None     # NIH-14 names; [] means "No Finding"; None means unknown
    severity: dict[str, float] | None = None
    # The source's own labels, kept beside the NIH-14 mapping: name -> 1 (present), 0 (absent),
    # None (unknown: blank, or uncertain under the 'ignore' policy). None when the source has none.
    source_labels: dict[str, int | None] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # age, sex, original path, original size

    def __post_init__(self):
        if "." in self.key or not self.key:
            raise ValueError(f"record key {self.key!r} must be non-empty and contain no '.'")
        if self.diagnosis is not None and self.diagnosis not in DIAGNOSES:
            raise ValueError(f"diagnosis {self.diagnosis!r} is not one of {DIAGNOSES}")
        if self.findings is not None:
            unknown = set(self.findings) - set(NIH_FINDINGS)
            if unknown:
                raise ValueError(f"unknown NIH findings {sorted(unknown)}")

    def to_json(self) -> dict[str, Any]:
        """The `<key>.json` payload of a shard sample."""
        return {
            "key": self.key,
            "source": self.source,
            "patient_id": self.patient_id,
            "view": self.view,
            "split": self.split,
            "labels": {
                "diagnosis": self.diagnosis,
                "findings": self.findings,
                "severity": self.severity,
                "source_labels": self.source_labels,
            },
            "meta": self.meta,
        }
