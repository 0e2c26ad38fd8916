"""Ray Tune sweeps over the downstream heads, split by concern (no module imports one that imports it back):

- `downstream.trials`: what runs inside a trial (trainables, per-trial fitting, SweepContext);
- `downstream.sweep`: the driver (settings, space, data, Tune config, restore, the test evaluation);
- `downstream.tune_results`: pure reporting (results.csv, best.json, trials.png);
- `downstream.tune_space`: the YAML search-space schema.

This module only re-exports the names callers used before the split.
"""
from __future__ import annotations

from downstream.config import SweepConfig
from downstream.sweep import (
    TASKS,
    SweepSettings,
    _tune_config,
    absolute_backbone,
    build_trainable,
    evaluate_best,
    fit_space_to_backbone,
    init_ray,
    run_sweep,
)
from downstream.trials import (
    METRIC,
    SweepContext,
    compute_severity_features,
    diagnosis_trainable,
    feature_backbone,
    features_as_images,
    resolve_severity_trial,
    seeded_backbone,
    severity_fold_metrics,
    severity_folds,
    severity_trainable,
)

__all__ = [
    "METRIC",
    "TASKS",
    "SweepConfig",
    "SweepContext",
    "SweepSettings",
    "_tune_config",
    "absolute_backbone",
    "build_trainable",
    "compute_severity_features",
    "diagnosis_trainable",
    "evaluate_best",
    "feature_backbone",
    "features_as_images",
    "fit_space_to_backbone",
    "init_ray",
    "resolve_severity_trial",
    "run_sweep",
    "seeded_backbone",
    "severity_fold_metrics",
    "severity_folds",
    "severity_trainable",
]
