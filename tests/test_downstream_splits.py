"""Patients stay on one side of every split downstream makes, and the ridge's inner CV is grouped.

Patients are read from the records themselves (fixtures_downstream.patient_ids), never through the
`groups` property under test, so a change that made every image its own group turns these red: the
phantom sets hold many patients with several images each.
"""
from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from fixtures_downstream import diagnosis_set, nih_shards, patient_ids, phantom_shards, severity_set

from downstream.data import (
    DIAGNOSIS_CLASSES,
    balance_per_class,
    diagnosis_target,
    findings_target,
    scan_index,
    split_indices,
)
from downstream.severity import GroupedRidge, fit_severity_head, repeated_splits, ridge_path
from downstream.trials import severity_folds


def _multi_image_patients(records) -> int:
    counts = Counter(f"{r['source']}:{r['patient_id']}" for r in records)
    return sum(c >= 2 for c in counts.values())


def _assert_apart(records, parts: dict) -> None:
    sets = {name: patient_ids(records, idx) for name, idx in parts.items()}
    for (a, pa), (b, pb) in combinations(sets.items(), 2):
        assert not pa & pb, f"patients in both {a} and {b}: {sorted(pa & pb)[:5]}"


def test_resplit_and_shard_splits_keep_patients_apart(tmp_path_factory):
    data = diagnosis_set(tmp_path_factory)
    assert _multi_image_patients(data.records) >= 10  # otherwise the test could not see a per-image split
    _assert_apart(data.records, split_indices(data))  # the shards' own splits
    for seed in range(4):
        splits = split_indices(data, seed=seed, resplit=True)
        assert sum(len(v) for v in splits.values()) == len(data)
        _assert_apart(data.records, splits)
        frac = len(splits["test"]) / len(data)
        assert 0.1 < frac < 0.3, frac


def test_repeated_grouped_splits_and_sweep_folds_keep_patients_apart(tmp_path_factory):
    data = severity_set(tmp_path_factory)
    assert _multi_image_patients(data.records) >= 10
    for test_size in (0.2, 0.5):  # seed 000's 8:2 and Cohen's 50/50
        for tr, te in repeated_splits(data.groups, 10, test_size, seed=0):
            _assert_apart(data.records, {"train": tr, "test": te})
    splits = split_indices(data, resplit=True)
    pool = np.sort(np.concatenate([splits["train"], splits["val"]]))
    folds = severity_folds(data.groups, pool, 5, seed=0)
    assert len(folds) == 5 and sorted(np.concatenate([te for _, te in folds]).tolist()) == pool.tolist()
    for tr, te in folds:
        _assert_apart(data.records, {"train": tr, "fold": te})


def test_balanced_index_and_streamed_nih_splits_keep_patients_apart(tmp_path_factory):
    shards = phantom_shards(tmp_path_factory)[1]
    index = scan_index(str(shards), diagnosis_target)
    full = diagnosis_set(tmp_path_factory)
    assert sorted(index.keys.tolist()) == sorted(r["key"] for r in full.records)  # JSON-only index sees the same set
    n = int(np.bincount(index.targets).min())
    picked = index.subset(balance_per_class(index.targets, n, seed=0))
    assert np.bincount(picked.targets).tolist() == [n] * len(DIAGNOSIS_CLASSES)
    _assert_apart(picked.records, split_indices(picked, resplit=True))

    nih = scan_index(str(nih_shards(tmp_path_factory)), findings_target)
    assert _multi_image_patients(nih.records) >= 5
    _assert_apart(nih.records, split_indices(nih))
    _assert_apart(nih.records, split_indices(nih, resplit=True, seed=1))


def test_ridge_path_is_standardised_sklearn_ridge():
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    wide = rng.normal(size=(30, 50))                      # fewer rows than features (the n x n Gram)
    tall = rng.normal(size=(80, 12))                      # more rows than features (the d x d Gram)
    dup = np.hstack([tall, tall[:, :4] * 2.0, np.ones((80, 1))])  # rank-deficient, one constant column
    for x in (wide, tall, dup):
        y, xt = rng.normal(size=(len(x), 2)), rng.normal(size=(7, x.shape[1]))
        for alpha in (0.1, 10.0):
            ref = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x, y).predict(xt)
            np.testing.assert_allclose(ridge_path(x, y, xt, [alpha, 1.0])[0], ref, rtol=1e-6, atol=1e-8)


def _near_duplicate_patients(patients=40, images=2, dim=60, seed=0):
    """Features that identify a patient but say nothing about the score: a row's near-twins (its flips,
    the patient's other image) predict it perfectly, a new patient not at all. So CV that leaks twins
    picks the smallest alpha, and CV that holds patients out picks the largest."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(patients, dim))
    pid = np.repeat(np.arange(patients), images)
    y = np.stack([rng.uniform(0, 8, patients)[pid], rng.uniform(0, 6, patients)[pid]], 1)

    def noisy():
        return base[pid] + 0.01 * rng.normal(size=(len(pid), dim))

    feats = {"names": [f"f{i}" for i in range(dim)], "none": noisy(), "h": noisy(), "v": noisy(), "hv": noisy()}
    return feats, y, pid


def test_ridge_inner_cv_is_patient_grouped_with_flips():
    feats, y, pid = _near_duplicate_patients()
    alphas = [1e-3, 1e-1, 10.0, 1e3, 1e5]
    cfg = {"regressor": "ridge", "alpha": alphas, "flip": "hv", "repeats": 4, "inner_folds": 5}
    res = fit_severity_head(feats, y, cfg, groups=pid)
    for t in ("geographic_mean", "opacity_mean"):
        chosen = res["targets"][t]["alpha"]
        assert len(chosen) == 4 and min(chosen) >= 1e3, (t, chosen)  # held-out patients: shrink hard

    # the control: the same estimator with leaky groups (each row its own group, i.e. leave-one-out-like
    # over rows that include flipped twins) picks the smallest alpha on these data
    x = np.concatenate([feats[f] for f in ("none", "h", "v", "hv")])
    yy = np.tile(y, (4, 1))
    leaky = GroupedRidge(alphas, 5).fit(x, yy, np.arange(len(x)))
    assert leaky.alpha_.max() <= 10, leaky.alpha_
    per_image = GroupedRidge(alphas, 5).fit(x, yy, np.tile(np.arange(len(pid)), 4))  # flips kept, patients not
    assert per_image.alpha_.max() <= 10, per_image.alpha_
    grouped = GroupedRidge(alphas, 5).fit(x, yy, np.tile(pid, 4))
    assert grouped.alpha_.min() >= 1e3


def test_one_alpha_skips_the_inner_cv():
    feats, y, pid = _near_duplicate_patients(patients=12)
    res = fit_severity_head(feats, y, {"regressor": "ridge", "alpha": 3.0, "flip": "none", "repeats": 2}, groups=pid)
    assert res["targets"]["geographic_mean"]["alpha"] == [3.0, 3.0]
    with pytest.raises(Exception, match="hv"):
        fit_severity_head({k: v for k, v in feats.items() if k != "hv"}, y, {"flip": "hv", "repeats": 2}, groups=pid)


def test_grouped_ridge_predicts_each_target_with_its_own_alpha():
    """Two targets whose CV picks different alphas: predict must use each target's own alpha (a predict that
    used one alpha for both, or swapped them, differs from the per-target ridge)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 8))
    y = np.stack([x @ rng.normal(size=8), rng.normal(size=60)], 1)  # signal (small alpha) | noise (large)
    model = GroupedRidge([0.01, 1e4], 5).fit(x, y, np.arange(60) // 2)
    assert model.alpha_.tolist() == [0.01, 1e4]
    xt = rng.normal(size=(5, 8))
    want = np.stack([ridge_path(x, y[:, [t]], xt, [a])[0, :, 0] for t, a in enumerate(model.alpha_)], 1)
    np.testing.assert_allclose(model.predict(xt), want, rtol=1e-10, atol=1e-12)
