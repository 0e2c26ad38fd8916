"""Ray Tune sweeps over the downstream heads (`launch/tune.py`).

The driver loads the shards once and passes them to every trial through the Ray object store
(`tune.with_parameters`), so trials never read files and never care that Tune chdirs them. For frozen
backbones (every severity sweep; diagnosis sweeps whose `mode` can be `linear`) it also computes the
backbone features once, for every feature kind and flip the space can ask for, and trials only fit heads:
a 100-trial severity sweep costs about one forward pass plus 100 cheap fits (`share_features=False`
recomputes them per trial, for the benchmark).

Validation and test never mix: diagnosis trials train on `train` and report validation macro-F1 once per
epoch (ASHA stops on epochs); severity trials run a patient-grouped K-fold CV on train+val and report the
running mean validation MSE once per fold (ASHA stops on folds). The test split is touched once, in the
driver, by retraining/refitting the best configuration (`downstream.tune_results`).

Every trial is a W&B run (runkit Tracker: key-free, offline by default) in a group named after the sweep,
with its own metrics.jsonl under OUT/trials/<trial_id>/.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from downstream.backbones import Backbone, load_backbone
from downstream.data import SEVERITY_TARGETS, ImageSet, split_indices
from downstream.tune_space import FLIP_SETS, load_space, max_value, possible_values, uses_grid
from runkit.errors import UserError

TASKS = ("diagnosis", "severity")
METRIC = {"diagnosis": ("val_macro_f1", "max"), "severity": ("val_mse", "min")}

SEVERITY_TRIAL_DEFAULTS = {
    "features": "pooled",      # pooled | multiscale | pathologies | comma list of named outputs (xrv/chexnet/nih14 backbones)
    "regressor": "ridge",      # linear | ridge (alpha) | mlp (sklearn MLPRegressor, L2 = alpha)
    "alpha": 1.0, "hidden": 32, "max_iter": 500,
    "flip": "none",            # none | h | v | hv (h, v and both): flipped copies of training rows + TTA
    "tta": True, "targets": list(SEVERITY_TARGETS), "folds": 5, "seed": 0, "batch_size": 32, "fail": False,
}


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its config; small and picklable."""

    task: str
    out_dir: str
    sweep: str
    backbone: str
    image_size: int
    backbone_seed: int = 0
    threads: int = 1
    wandb_mode: str = "disabled"
    wandb_project: str = "xray-genesis"


# ----------------------------------------------------------------------------------------------- helpers


def absolute_backbone(spec: str) -> str:
    """Make file parts of a backbone spec absolute, because trials run in their own directories."""
    head, sep, rest = str(spec).partition(":")
    if head == "scratch":
        return spec
    if sep and head in ("xrv", "chexnet", "nih14") and rest:
        return f"{head}:{Path(rest).expanduser().resolve()}"
    return str(Path(spec).expanduser().resolve())


def seeded_backbone(spec: str, image_size: int | None, seed: int) -> Backbone:
    """The same weights in the driver and in every trial (a scratch backbone is random)."""
    torch.manual_seed(int(seed))
    return load_backbone(spec, image_size=image_size)


class FeatureBody(nn.Module):
    """Identity body: 'images' are precomputed pooled features shaped [N, D, 1, 1]."""

    def forward(self, x):
        return x


def feature_backbone(num_features: int, spec: str) -> Backbone:
    """A Backbone whose pooled output is its input, so `train_diagnosis(mode=linear)` trains a head on
    shared features without running (or even holding) the real backbone."""
    return Backbone(FeatureBody(), num_features, kind="features", arch=spec, image_size=1)


def features_as_images(features: np.ndarray, data: ImageSet) -> ImageSet:
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))[:, :, None, None]
    return ImageSet(x, data.targets, data.records)


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)[:120]


def _trial_tracker(ctx: SweepContext, config: dict):
    from ray import tune

    from runkit.tracking import Tracker

    tc = tune.get_context()
    trial_id = tc.get_trial_id() or "local"
    return Tracker(Path(ctx.out_dir) / "trials" / trial_id, config, project=ctx.wandb_project, group=ctx.sweep,
                   name=f"{ctx.sweep}-{trial_id}", job_type="trial", mode=ctx.wandb_mode,
                   resume_id=_safe_id(f"{ctx.sweep}-{trial_id}"))


def _check_fail(config: dict, reports: int) -> None:
    """Fault injection for tests and demos: `fail: true` raises after the first report, `fail: N` after the N-th."""
    fail = config.get("fail")
    if fail is True or (not isinstance(fail, bool) and isinstance(fail, int) and fail > 0 and reports >= fail):
        raise RuntimeError(f"injected failure after report {reports} (config fail={fail!r})")


def _numeric(row: dict) -> dict:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float, np.floating, np.integer))
            and not isinstance(v, bool)}


# -------------------------------------------------------------------------------------- diagnosis trials


def diagnosis_trial_config(config: dict, ctx: SweepContext) -> dict:
    cfg = {k: v for k, v in config.items() if k != "fail"}
    cfg.update(backbone=ctx.backbone, image_size=ctx.image_size, progress=False,
               num_threads=cfg.get("num_threads") or ctx.threads, scorecam_per_class=0)
    return cfg


def diagnosis_trainable(config: dict, ctx: SweepContext, data: ImageSet, splits: dict,
                        features: ImageSet | None = None) -> None:
    """One diagnosis trial: train on `train`, report validation metrics per epoch. The trial never sees
    the test images (its 'test' split is the validation split; the driver evaluates test once)."""
    from ray import tune

    from downstream.diagnosis import train_diagnosis

    cfg = diagnosis_trial_config(config, ctx)
    trial_splits = {"train": splits["train"], "val": splits["val"], "test": splits["val"]}
    backbone = None
    if cfg.get("mode") == "linear" and features is not None:
        data, backbone = features, feature_backbone(int(features.images.shape[1]), ctx.backbone)
    tracker = _trial_tracker(ctx, config)
    state = {"reports": 0, "best": -np.inf}
    epochs = int(cfg.get("epochs") or 1)

    def report(row: dict) -> None:
        state["reports"] += 1
        metrics = _numeric(row)
        f1 = metrics.get("val_macro_f1", float("nan"))
        state["best"] = max(state["best"], f1) if np.isfinite(f1) else state["best"]
        metrics.update(best_val_macro_f1=state["best"], complete=float(int(row["epoch"]) >= epochs))
        tracker.log(metrics, step=int(row["epoch"]))
        tune.report(metrics)
        _check_fail(config, state["reports"])

    try:
        train_diagnosis(cfg, data=data, splits=trial_splits, backbone=backbone, report=report)
    finally:
        tracker.finish()


# --------------------------------------------------------------------------------------- severity trials


def resolve_severity_trial(config: dict) -> dict:
    cfg = {**SEVERITY_TRIAL_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if cfg["regressor"] not in ("linear", "ridge", "mlp"):
        raise UserError(f"severity regressor {cfg['regressor']!r} is not linear, ridge or mlp")
    if str(cfg["flip"]) not in FLIP_SETS:
        raise UserError(f"severity flip {cfg['flip']!r} is not one of {', '.join(FLIP_SETS)}")
    if isinstance(cfg["targets"], str):
        cfg["targets"] = [t for t in cfg["targets"].split(",") if t]
    bad = [t for t in cfg["targets"] if t not in SEVERITY_TARGETS]
    if bad or not cfg["targets"]:
        raise UserError(f"severity targets {cfg['targets']} must be among {', '.join(SEVERITY_TARGETS)}")
    if int(cfg["folds"]) < 2:
        raise UserError("severity folds must be at least 2")
    return cfg


def feature_kind(features: str) -> str:
    """The extractor a `features` value needs: pooled, multiscale, or pathologies (all/subsets of named outputs)."""
    return str(features) if str(features) in ("pooled", "multiscale") else "pathologies"


def severity_fold_metrics(feats: dict, targets: np.ndarray, cfg: dict, train_idx, eval_idx) -> dict:
    """Fit the trial's regressor on `train_idx` rows (plus flipped copies) and score `eval_idx`:
    {target: {mse, mae, pearson_r, r2}}. linear/ridge go through `fit_severity_head`; the MLP (which that
    function does not offer) follows the same protocol here: flips as extra rows, TTA, clipping to range."""
    from downstream.severity import fit_severity_head

    flips = FLIP_SETS[str(cfg["flip"])]
    columns = None if str(cfg["features"]) in ("pooled", "multiscale", "pathologies", "all") else str(cfg["features"])
    if cfg["regressor"] in ("linear", "ridge"):
        head_cfg = {"regressor": cfg["regressor"], "alphas": [float(cfg["alpha"])], "targets": cfg["targets"],
                    "train_flips": flips, "tta": bool(cfg["tta"]), "columns": columns, "progress": False}
        res = fit_severity_head(feats, targets, head_cfg, splits=[(np.asarray(train_idx), np.asarray(eval_idx))])
        return {t: {m: v["mean"] for m, v in r["model"].items()} for t, r in res["targets"].items()}
    return _mlp_fold_metrics(feats, targets, cfg, flips, columns, np.asarray(train_idx), np.asarray(eval_idx))


def _mlp_fold_metrics(feats, targets, cfg, flips, columns, tr, te) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from downstream.backbones import select_pathologies
    from downstream.metrics import regression_metrics
    from shards.record import SEVERITY_RANGES

    cols = slice(None) if columns is None else np.asarray(select_pathologies(tuple(feats["names"]), columns))
    used = ["none"] + list(flips)
    tta = used if cfg["tta"] else ["none"]
    y_all = np.asarray(targets, dtype=float)
    out = {}
    for t in cfg["targets"]:
        y = y_all[:, SEVERITY_TARGETS.index(t)]
        reg = make_pipeline(StandardScaler(), MLPRegressor(
            hidden_layer_sizes=(int(cfg["hidden"]),), alpha=float(cfg["alpha"]), max_iter=int(cfg["max_iter"]),
            early_stopping=False, random_state=int(cfg["seed"])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            reg.fit(np.concatenate([feats[f][tr][:, cols] for f in used]), np.tile(y[tr], len(used)))
        pred = np.clip(np.mean([reg.predict(feats[f][te][:, cols]) for f in tta], axis=0), *SEVERITY_RANGES[t])
        out[t] = regression_metrics(y[te], pred)
    return out


def severity_folds(groups: np.ndarray, pool: np.ndarray, folds: int, seed: int) -> list[tuple]:
    """Patient-grouped K folds over `pool` (train+val), as absolute indices."""
    from sklearn.model_selection import GroupKFold

    g = groups[pool]
    k = max(2, min(int(folds), len(set(g.tolist()))))
    if len(set(g.tolist())) < 2:
        raise UserError("severity cross-validation needs at least 2 patients in train+val")
    try:
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=int(seed))
    except TypeError:  # scikit-learn < 1.6 has no shuffling GroupKFold
        splitter = GroupKFold(n_splits=k)
    return [(pool[a], pool[b]) for a, b in splitter.split(np.zeros(len(pool)), groups=g)]


def compute_severity_features(backbone: Backbone, images: torch.Tensor, kinds, flips, batch_size: int = 32,
                              progress: bool = False) -> dict:
    """{kind: extract_features(...)} for every kind the sweep (or one trial) needs."""
    from downstream.severity import FLIPS, extract_features

    flips = sorted({"none", *flips}, key=FLIPS.index)
    return {k: extract_features(backbone, images, k, flips=flips, batch_size=batch_size, progress=progress)
            for k in sorted(set(kinds))}


def severity_trainable(config: dict, ctx: SweepContext, targets: np.ndarray, groups: np.ndarray, splits: dict,
                       features: dict | None = None, images: torch.Tensor | None = None) -> None:
    """One severity trial: K-fold CV on train+val, one report per fold (running mean validation MSE).

    `features` are the driver's shared features; without them (`images` given) the trial loads the backbone
    and extracts what it needs itself, which is what sharing saves."""
    from ray import tune

    cfg = resolve_severity_trial(config)
    torch.set_num_threads(max(1, int(ctx.threads)))
    kind = feature_kind(cfg["features"])
    if features is None:
        backbone = seeded_backbone(ctx.backbone, ctx.image_size, ctx.backbone_seed)
        features = compute_severity_features(backbone, images, [kind], FLIP_SETS[str(cfg["flip"])],
                                             batch_size=int(cfg["batch_size"]))
    feats = features[kind]
    pool = np.sort(np.concatenate([splits["train"], splits["val"]]))
    folds = severity_folds(groups, pool, int(cfg["folds"]), int(cfg["seed"]))
    tracker = _trial_tracker(ctx, config)
    per_target: dict[str, list] = {t: [] for t in cfg["targets"]}
    try:
        for k, (tr, te) in enumerate(folds, start=1):
            res = severity_fold_metrics(feats, targets, cfg, tr, te)
            for t in cfg["targets"]:
                per_target[t].append(res[t]["mse"])
            metrics = {f"val_mse_{t}": float(np.mean(v)) for t, v in per_target.items()}
            metrics.update(val_mse=float(np.mean([metrics[f"val_mse_{t}"] for t in cfg["targets"]])),
                           fold=k, fold_mse=float(np.mean([res[t]["mse"] for t in cfg["targets"]])),
                           complete=float(k == len(folds)))
            tracker.log(metrics, step=k)
            tune.report(metrics)
            _check_fail(config, k)
    finally:
        tracker.finish()


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class SweepSettings:
    """Everything that defines a sweep; saved as OUT/sweep.json so `--resume` needs only OUT."""

    task: str
    shards: list
    backbone: str
    space: str | None
    out: str
    overrides: list | None = None
    num_samples: int = 8
    scheduler: str = "asha"
    search: str = "random"
    grace_period: int = 1
    reduction_factor: int = 2
    max_failures: int = 1
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    image_size: int | None = None
    seed: int = 0
    name: str | None = None
    share_features: bool = True
    wandb_project: str = "xray-genesis"
    wandb_mode: str | None = None
    split_seed: int = 0
    resplit: bool = False


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             verbose: int = 1) -> None:
    """Start a local Ray (the CPUs/GPUs the user allows; all local CPUs by default) or join a cluster."""
    import ray

    if ray.is_initialized():
        return
    kw = {"include_dashboard": False, "log_to_driver": verbose >= 2, "logging_level": logging.WARNING}
    if address:
        if num_cpus or num_gpus:
            raise UserError("--num-cpus/--num-gpus size a local Ray; a cluster (--address) has its own resources")
        ray.init(address=address, **kw)
    else:
        ray.init(address="local", num_cpus=int(num_cpus or os.cpu_count() or 1), num_gpus=int(num_gpus or 0), **kw)


def _load_settings(out: Path, given: SweepSettings | None, resume: bool) -> SweepSettings:
    saved = out / "sweep.json"
    if resume:
        if not saved.is_file():
            raise UserError(f"--resume: {saved} not found; nothing to resume in {out}")
        s = SweepSettings(**json.loads(saved.read_text())["settings"])
        if given is not None and given.task != s.task:
            raise UserError(f"--resume: {out} holds a {s.task} sweep, not {given.task}")
        return s
    if given is None:
        raise UserError("no sweep settings given")
    if (out / "ray").exists() and any((out / "ray").iterdir()):
        raise UserError(f"{out} already holds a sweep; use --resume to continue it or choose another --out")
    return given


def _prepare(s: SweepSettings, raw: dict) -> dict:
    """Driver-side loading: backbone, data, splits and (frozen backbones) the shared features."""
    from downstream.diagnosis import check_classes, load_diagnosis_data
    from downstream.severity import load_severity_data

    if not s.shards:
        raise UserError("--shards is required")
    backbone = seeded_backbone(s.backbone, s.image_size, 0)
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

            feats = extract_features(backbone, data.images, "pooled", flips=("none",), progress=True)
            prep["features"] = features_as_images(feats["none"], data)
        return prep
    for name in ("train", "val", "test"):
        if len(splits[name]) == 0:
            raise UserError(f"the severity {name} split is empty; use more scored images or --resplit")
    feature_sets = possible_values(raw, "features", SEVERITY_TRIAL_DEFAULTS["features"])
    kinds = {feature_kind(f) for f in feature_sets} or {"pooled"}
    if "pathologies" in kinds and backbone.pathology_names is None:
        raise UserError(f"the space asks for pathology features {feature_sets} but backbone {s.backbone} has no "
                        "named outputs; use xrv:FILE, chexnet:FILE or nih14:DIR, or --set features=pooled")
    flips = sorted({f for v in possible_values(raw, "flip", "none") or list(FLIP_SETS) for f in FLIP_SETS[str(v)]})
    prep["kinds"], prep["flips"] = kinds, flips
    if s.share_features:
        bs = int(raw.get("batch_size", 32)) if not isinstance(raw.get("batch_size"), dict) else 32
        prep["features"] = compute_severity_features(backbone, data.images, kinds, flips, batch_size=bs,
                                                     progress=True)
    return prep


def build_trainable(s: SweepSettings, ctx: SweepContext, prep: dict):
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


def trial_dirname(trial) -> str:
    return trial.trial_id


def run_sweep(settings: SweepSettings | None = None, *, out: str | Path | None = None, resume: bool = False,
              address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
              verbose: int = 1, evaluate: bool = True) -> dict:
    """Run (or resume) a sweep and write OUT/results.csv, OUT/best.json and OUT/trials.png.

    Returns {"experiment_path", "rows", "best", "files"}. Ray is started here unless already initialised.
    """
    from ray import tune

    from downstream import tune_results
    from runkit.atomic import atomic_write_json
    from runkit.tracking import default_wandb_mode

    out = Path(out or settings.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = _load_settings(out, settings, resume)
    if s.task not in TASKS:
        raise UserError(f"task {s.task!r} is not one of {TASKS}")
    if s.num_samples < 1 or s.cpus_per_trial <= 0 or s.gpus_per_trial < 0:
        raise UserError("--num-samples must be >= 1, --cpus-per-trial > 0 and --gpus-per-trial >= 0")
    s.out = str(out)
    s.space = str(Path(s.space).expanduser().resolve()) if s.space else None
    s.backbone = absolute_backbone(s.backbone)
    s.name = s.name or _safe_id(f"{s.task}-{out.name}")
    param_space, raw = load_space(s.space, s.task, s.overrides)
    if s.search == "optuna" and uses_grid(raw):
        raise UserError("grid entries need --search random (Optuna samples, it does not enumerate grids)")
    if s.scheduler not in ("asha", "fifo") or s.search not in ("random", "optuna"):
        raise UserError("--scheduler is asha or fifo, --search is random or optuna")
    wandb_mode = s.wandb_mode or default_wandb_mode()
    if not resume:
        atomic_write_json(out / "sweep.json", {"settings": asdict(s), "space": raw})

    prep = _prepare(s, raw)
    ctx = SweepContext(task=s.task, out_dir=str(out), sweep=s.name, backbone=s.backbone,
                       image_size=prep["image_size"], threads=max(1, int(s.cpus_per_trial)),
                       wandb_mode=wandb_mode, wandb_project=s.wandb_project)
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
    return tune_results.finalize(s, ctx, prep, str(exp_path), raw, evaluate=evaluate)


def _tune_config(s: SweepSettings, raw: dict, metric: str, mode: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    max_t = max_value(raw, "epochs", 10) if s.task == "diagnosis" else max_value(raw, "folds",
                                                                                  SEVERITY_TRIAL_DEFAULTS["folds"])
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
