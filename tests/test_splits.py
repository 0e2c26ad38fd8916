"""Patient-grouped splits: deterministic, order-free, patient-disjoint, and the NIH val draw."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

from shards.splits import PatientGroups, draw_val_patients, nih_val_target, patient_split, unit_hash


def test_patient_split_is_a_pure_function_near_64_16_20():
    patients = [f"p{i}" for i in range(5000)]
    splits = [patient_split("covid-chestxray", p) for p in patients]
    assert splits == [patient_split("covid-chestxray", p) for p in reversed(patients)][::-1]
    share = Counter(splits)
    assert abs(share["train"] / 5000 - 0.64) < 0.03
    assert abs(share["val"] / 5000 - 0.16) < 0.03
    assert abs(share["test"] / 5000 - 0.20) < 0.03
    # the source is part of the hash: the same ids split differently per data set
    assert splits != [patient_split("actualmed", p) for p in patients]


def test_splits_are_stable_across_processes():
    """sha256, not Python's per-process salted hash(): two interpreters with different hash seeds agree."""
    code = "from shards.splits import patient_split; print([patient_split('nih', str(i)) for i in range(50)])"
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2")
    }
    assert outs == {str([patient_split("nih", str(i)) for i in range(50)]) + "\n"}
    assert 0.0 <= unit_hash("a") < 1.0
    assert unit_hash("a", "bc") != unit_hash("ab", "c")  # parts are separated


def test_nih_val_target():
    assert nih_val_target(86_524) == 1000
    assert nih_val_target(200_000) == 1000
    assert nih_val_target(1000) == 12
    assert nih_val_target(10) == 1
    assert nih_val_target(0) == 0


def test_val_draw_hits_the_target_with_whole_patients_whatever_the_order():
    rng = random.Random(0)
    per_patient = {f"{i:05d}": rng.randint(1, 12) for i in range(3000)}
    chosen = draw_val_patients(per_patient, 1000)
    assert sum(per_patient[p] for p in chosen) == 1000
    shuffled = dict(rng.sample(list(per_patient.items()), len(per_patient)))
    assert draw_val_patients(shuffled, 1000) == chosen
    assert len(chosen) < len(per_patient)


def test_val_draw_small_sets():
    assert draw_val_patients({"a": 5}, 1) == set()           # one patient stays in train
    assert len(draw_val_patients({"a": 5, "b": 7}, 1)) == 1  # at least one patient even if it overshoots
    assert draw_val_patients({"a": 1, "b": 1}, 0) == set()


def test_patient_groups_union_is_order_independent():
    g1 = PatientGroups()
    g1.union("339", "285")
    g1.union("340", "287")
    g2 = PatientGroups(["287", "340", "285", "339"])
    g2.union("285", "339")
    g2.union("287", "340")
    for g in (g1, g2):
        assert g.find("339") == g.find("285") == "285"
        assert g.find("340") == "287"
        assert g.find("new") == "new"
