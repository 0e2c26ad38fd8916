"""Deterministic, patient-grouped splits that depend on nothing but the source and the patient id.

A split is a pure function of (source, patient group), so it is the same whatever the input order,
the `--part` a machine builds, or which files happen to be present. No patient is ever in two splits.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

FRACTIONS = (("train", 0.64), ("val", 0.16), ("test", 0.20))
NIH_VAL_IMAGES = 1000          # the paper's validation set: 1,000 images out of train_val
NIH_TRAIN_VAL_IMAGES = 86_524  # images in the official train_val_list.txt


def unit_hash(*parts: str) -> float:
    """A stable number in [0, 1) from strings (sha256, so not Python's salted hash)."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def patient_split(source: str, patient: str) -> str:
    """train / val / test at 64 / 16 / 20 % of patients, from a hash of source and patient id."""
    u = unit_hash(source, patient)
    edge = 0.0
    for name, frac in FRACTIONS:
        edge += frac
        if u < edge:
            return name
    return FRACTIONS[-1][0]


def nih_val_target(n_train_val: int) -> int:
    """1,000 for the full NIH train_val list; the same proportion (at least 1) for smaller sets."""
    if n_train_val <= 0:
        return 0
    return min(NIH_VAL_IMAGES, max(1, math.ceil(n_train_val * NIH_VAL_IMAGES / NIH_TRAIN_VAL_IMAGES)))


def draw_val_patients(images_per_patient: Mapping[str, int], target: int, source: str = "nih") -> set[str]:
    """Whole patients, in hash order, whose images add up to `target` without overshooting.

    Greedy over a fixed pseudo-random order, so the draw is deterministic and independent of input
    order. At least one patient is drawn (when there are two or more) even if it overshoots a tiny
    target, and at least one patient always stays in train.
    """
    patients = sorted(images_per_patient, key=lambda p: (unit_hash(source, "val", p), p))
    if len(patients) < 2 or target <= 0:
        return set()
    chosen: set[str] = set()
    count = 0
    for p in patients[:-1]:  # the last patient in hash order is never drawn, so train is never empty
        n = images_per_patient[p]
        if count + n <= target:
            chosen.add(p)
            count += n
            if count == target:
                break
    if not chosen:
        chosen.add(min(patients[:-1], key=lambda p: (images_per_patient[p], unit_hash(source, "val", p), p)))
    return chosen


class PatientGroups:
    """Union-find over patient ids: ids that share an image (a duplicated CSV row under two patient
    ids, as in covid-chestxray) must land in one split, so they get one canonical group id."""

    def __init__(self, ids: Iterable[str] = ()):
        self._parent: dict[str, str] = {}
        for i in ids:
            self.add(i)

    def add(self, pid: str) -> None:
        self._parent.setdefault(pid, pid)

    def find(self, pid: str) -> str:
        self.add(pid)
        root = pid
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[pid] != root:
            self._parent[pid], pid = root, self._parent[pid]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))  # the smaller id is the canonical one: order-independent
            self._parent[hi] = lo
