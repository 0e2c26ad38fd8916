"""The Ray Tune driver for downstream sweeps (`launch/tune.py`): settings, the space, data, Tune's config,
restore, and the one evaluation of the best configuration on test.

The driver loads the shards once and passes them to every trial through the Ray object store
(`tune.with_parameters`), so trials never read files and never care that Tune chdirs them. For frozen
backbones (every severity sweep; diagnosis sweeps whose `mode` can be `linear`) it also computes the
backbone features once, on its device, for every feature kind and flip the space can ask for, and trials
only fit heads.

The space fits the backbone: feature sets that need named outputs (pathologies, lung_opacity, ...) stay
in the space only when the backbone has named outputs (xrv, CheXNet, nih14). Otherwise the driver drops
them, says so, and records what it left out in OUT/sweep.json and best.json.

Trials (downstream.trials) run on the GPUs Ray gives them (`--gpus-per-trial`); reporting is
downstream.tune_results. The test split is touched once, here, by refitting the best configuration.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from downstream.config import FLIP_SETS, SeverityConfig, SweepConfig
from downstream.data import split_indices
from downstream.severity import feature_kind, needs_named_outputs
from downstream.trials import (
    METRIC,
    SweepContext,
    compute_severity_features,
    diagnosis_trainable,
    diagnosis_trial_config,
    feature_backbone,
    features_as_images,
    resolve_severity_trial,
    safe_id,
    seeded_backbone,
    severity_fold_metrics,
    severity_trainable,
)
from downstream.tune_space import drop_values, max_value, parse_space, possible_values, read_space, uses_grid
from runkit.errors import UserError

TASKS = ("diagnosis", "severity")
SweepSettings = SweepConfig  # the name benchmarks and older callers use
_SEV = SeverityConfig.field_map()
DEFAULT_FEATURES, DEFAULT_FLIP, DEFAULT_FOLDS = (_SEV[k].default for k in ("features", "flip", "folds"))


def absolute_backbone(spec: str) -> str:
    """Make file parts of a backbone spec absolute, because trials run in their own directories."""
    head, sep, rest = str(spec).partition(":")
    if head == "scratch":
        return spec
    if sep and head in ("xrv", "chexnet", "nih14") and rest:
        return f"{head}:{Path(rest).expanduser().resolve()}"
    return str(Path(spec).expanduser().resolve())


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             verbose: int = 1) -> None:
    """Start a local Ray (the CPUs/GPUs the user allows; all local CPUs and GPUs by default) or join a cluster."""
    import ray

    if ray.is_initialized():
        return
    kw = {"include_dashboard": False, "log_to_driver": verbose >= 2, "logging_level": logging.WARNING}
    if address:
        if num_cpus or num_gpus:
            raise UserError("--num-cpus/--num-gpus size a local Ray; a cluster (--address) has its own resources")
        ray.init(address=address, **kw)
    else:
        ray.init(address="local", num_cpus=int(num_cpus or os.cpu_count() or 1),
                 **({"num_gpus": int(num_gpus)} if num_gpus is not None else {}), **kw)


def _load_settings(out: Path, given: SweepConfig | None, resume: bool) -> SweepConfig:
    saved = out / "sweep.json"
    if resume:
        if not saved.is_file():
            raise UserError(f"--resume: {saved} not found; nothing to resume in {out}")
        s = SweepConfig.from_dict(json.loads(saved.read_text())["settings"], str(saved))
        if given is not None and given.task != s.task:
            raise UserError(f"--resume: {out} holds a {s.task} sweep, not {given.task}")
        return s
    if given is None:
        raise UserError("no sweep settings given")
    if (out / "ray").exists() and any((out / "ray").iterdir()):
        raise UserError(f"{out} already holds a sweep; use --resume to continue it or choose another --out")
    return given


def fit_space_to_backbone(raw: dict, task: str, has_named_outputs: bool, backbone: str) -> tuple[dict, list]:
    """Drop the feature sets a backbone without named outputs cannot give: (raw space, left out)."""
    if task != "severity" or has_named_outputs:
        return raw, []
    fitted, dropped = drop_values(raw, "features", DEFAULT_FEATURES, needs_named_outputs)
    if dropped and "features" not in fitted:
        raise UserError(f"the space asks only for named-output features {dropped}, but backbone {backbone} has "
                        "none; use xrv:FILE, chexnet:FILE or nih14:DIR, or --set features=pooled")
    return fitted, dropped


def _prepare(s: SweepConfig, raw: dict, device, backbone) -> dict:
    """Driver-side loading: data, splits and (frozen backbones) the shared features."""
    from downstream.diagnosis import check_classes, load_diagnosis_data
    from downstream.severity import load_severity_data

    image_size = int(s.image_size or backbone.image_size)
    shards = [str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for p in s.shards]
    loader = load_diagnosis_data if s.task == "diagnosis" else load_severity_data
    data = loader(shards, image_size)
    splits = split_indices(data, seed=int(s.split_seed), resplit=bool(s.resplit))
    prep = {"backbone": backbone, "image_size": image_size, "data": data, "splits": splits, "features": None}
    if s.task == "diagnosis":
        check_classes(data, splits)
        if s.share_features and "linear" in possible_values(raw, "mode", "full"):
            from downstream.severity import extract_features

            feats = extract_features(backbone, data.images, "pooled", flips=("none",), progress=True, device=device)
            prep["features"] = features_as_images(feats["none"], data)
        return prep
    for name in ("train", "val", "test"):
        if len(splits[name]) == 0:
            raise UserError(f"the severity {name} split is empty; use more scored images or --resplit")
    feature_sets = possible_values(raw, "features", DEFAULT_FEATURES)
    kinds = {feature_kind(f) for f in feature_sets} or {"pooled"}
    if "pathologies" in kinds and backbone.pathology_names is None:
        raise UserError(f"the space asks for pathology features {feature_sets} but backbone {s.backbone} has no "
                        "named outputs; use xrv:FILE, chexnet:FILE or nih14:DIR, or --set features=pooled")
    flips = sorted({f for v in possible_values(raw, "flip", DEFAULT_FLIP) or list(FLIP_SETS) for f in FLIP_SETS[str(v)]})
    prep["kinds"], prep["flips"] = kinds, flips
    if s.share_features:
        bs = int(raw.get("batch_size", 32)) if not isinstance(raw.get("batch_size"), dict) else 32
        prep["features"] = compute_severity_features(backbone, data.images, kinds, flips, batch_size=bs,
                                                     progress=True, device=device)
    backbone.cpu()
    return prep


def build_trainable(s: SweepConfig, ctx: SweepContext, prep: dict):
    from ray import tune

    data, splits = prep["data"], prep["splits"]
    if s.task == "diagnosis":
        fn = tune.with_parameters(diagnosis_trainable, ctx=ctx, data=data, splits=splits, features=prep["features"])
    elif prep["features"] is not None:
        fn = tune.with_parameters(severity_trainable, ctx=ctx, targets=data.targets, groups=data.groups,
                                  splits=splits, features=prep["features"])
    else:
        fn = tune.with_parameters(severity_trainable, ctx=ctx, targets=data.targets, groups=data.groups,
                                  splits=splits, images=data.images)
    res = {"cpu": float(s.cpus_per_trial)}
    if s.gpus_per_trial:
        res["gpu"] = float(s.gpus_per_trial)
    return tune.with_resources(fn, res)


def evaluate_best(s: SweepConfig, ctx: SweepContext, prep: dict, config: dict, device) -> dict:
    """Retrain/refit the best configuration in the driver on the real splits; touches test exactly once."""
    from runkit.jsonsafe import to_jsonable

    splits, data = prep["splits"], prep["data"]
    if s.task == "diagnosis":
        from downstream.diagnosis import train_diagnosis

        cfg = diagnosis_trial_config(config, ctx, str(device))
        backbone = None
        if cfg.get("mode") == "linear" and prep["features"] is not None:
            data = prep["features"]
            backbone = feature_backbone(int(data.images.shape[1]), ctx.backbone)
        res = train_diagnosis(cfg, data=data, splits=splits, backbone=backbone)
        keep = ("accuracy", "macro_f1", "balanced_accuracy", "macro_auroc", "per_class", "confusion", "n")
        return to_jsonable({"validation": {k: res["val"].get(k) for k in keep},
                            "test": {k: res["test"].get(k) for k in keep}, "best_epoch": res["best_epoch"]})
    cfg = resolve_severity_trial(config)
    kind = feature_kind(cfg["features"])
    feats = prep["features"]
    if feats is None:
        feats = compute_severity_features(prep["backbone"], data.images, [kind], FLIP_SETS[str(cfg["flip"])],
                                          device=device)
    pool = np.sort(np.concatenate([splits["train"], splits["val"]]))
    test = severity_fold_metrics(feats[kind], data.targets, cfg, pool, splits["test"], data.groups)
    test["mse"] = float(np.mean([test[t]["mse"] for t in cfg["targets"]]))
    return to_jsonable({"test": test, "n_train_val": len(pool), "n_test": len(splits["test"])})


def trial_dirname(trial) -> str:
    return trial.trial_id


def run_sweep(settings: SweepConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
              address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
              verbose: int = 1, evaluate: bool = True) -> dict:
    """Run (or resume) a sweep and write OUT/results.csv, OUT/best.json and OUT/trials.png.

    Returns {"experiment_path", "rows", "best", "files", "left_out"}. Ray is started here unless already
    initialised.
    """
    from ray import tune

    from downstream import tune_results
    from downstream.device import parse_device
    from runkit.atomic import atomic_write_json
    from runkit.tracking import default_wandb_mode

    out = Path(out or settings.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = _load_settings(out, settings, resume)
    if s.task not in TASKS:
        raise UserError(f"task {s.task!r} is not one of {TASKS}")
    s = SweepConfig.from_dict(asdict(s), "sweep settings")  # re-validate (programmatic callers, old sweep.json)
    device = parse_device(s.device)
    if s.gpus_per_trial > 0:
        import torch

        if not torch.cuda.is_available() and not address:
            raise UserError("--gpus-per-trial > 0 but this machine has no CUDA GPU (a cluster: use --address)")
    s.out = str(out)
    s.space = str(Path(s.space).expanduser().resolve()) if s.space else None
    s.backbone = absolute_backbone(s.backbone)
    s.name = s.name or safe_id(f"{s.task}-{out.name}")
    if not s.shards:
        raise UserError("--shards is required")
    backbone = seeded_backbone(s.backbone, s.image_size, 0)
    raw = read_space(s.space, s.overrides)
    if not resume:
        raw, left_out = fit_space_to_backbone(raw, s.task, backbone.pathology_names is not None, s.backbone)
    else:
        saved = json.loads((out / "sweep.json").read_text())
        raw, left_out = saved["space"], saved.get("left_out", [])
    if left_out:
        print(f"sweep: backbone {s.backbone} has no named outputs; left out of the space: features "
              f"{', '.join(map(str, left_out))}", file=sys.stderr, flush=True)
    param_space = parse_space(raw, s.task, str(s.space or "search space"))
    if s.search == "optuna" and uses_grid(raw):
        raise UserError("grid entries need --search random (Optuna samples, it does not enumerate grids)")
    wandb_mode = s.wandb_mode or default_wandb_mode()
    if not resume:
        atomic_write_json(out / "sweep.json", {"settings": asdict(s), "space": raw, "left_out": left_out})

    prep = _prepare(s, raw, device, backbone)
    ctx = SweepContext(task=s.task, out_dir=str(out), sweep=s.name, backbone=s.backbone,
                       image_size=prep["image_size"], threads=max(1, int(s.cpus_per_trial)),
                       wandb_mode=wandb_mode, wandb_project=s.wandb_project, gpus_per_trial=float(s.gpus_per_trial))
    init_ray(address, num_cpus, num_gpus, verbose)
    trainable = build_trainable(s, ctx, prep)
    metric, mode = METRIC[s.task]
    exp_path = out / "ray" / s.name
    if resume:
        if not tune.Tuner.can_restore(str(exp_path)):
            raise UserError(f"--resume: no restorable Tune experiment at {exp_path}")
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space,
                           tune_config=_tune_config(s, raw, metric, mode),
                           run_config=tune.RunConfig(name=s.name, storage_path=str(out / "ray"), verbose=verbose,
                                                     failure_config=tune.FailureConfig(max_failures=s.max_failures)))
    tuner.fit()
    result = tune_results.finalize(
        s, str(exp_path), metric, mode, wandb_mode=wandb_mode,
        evaluate=(lambda config: evaluate_best(s, ctx, prep, config, device)) if evaluate else None,
        extra={"left_out": {"features": left_out}} if left_out else None)
    result["left_out"] = left_out
    return result


def _tune_config(s: SweepConfig, raw: dict, metric: str, mode: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    max_t = max_value(raw, "epochs", 10) if s.task == "diagnosis" else max_value(raw, "folds", DEFAULT_FOLDS)
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(1, max_t),
                                  grace_period=max(1, min(int(s.grace_period), max_t)),
                                  reduction_factor=max(2, int(s.reduction_factor)))
    else:
        scheduler = FIFOScheduler()
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=int(s.seed))
    else:
        search = BasicVariantGenerator(random_state=int(s.seed))
    return tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, search_alg=search,
                           num_samples=int(s.num_samples), reuse_actors=True, trial_dirname_creator=trial_dirname)
