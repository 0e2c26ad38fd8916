"""`launch/downstream.py {diagnosis,severity,nih14,compare}`: argument parsing and one job per subcommand.

Config layering is runkit's: defaults here, then `--config FILE.yaml` (keys = flag names), then flags.
Every job writes OUT/config.yaml, OUT/metrics.json, OUT/metrics.jsonl and its PNGs, and prints where.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from runkit.config import parse_layered, save_resolved
from runkit.errors import UserError

TASKS = ("diagnosis", "severity", "nih14", "compare")
TRAIN_KEYS = ("mode", "head", "hidden", "dropout", "lr", "backbone_lr", "unfreeze", "lr_decay", "weight_decay",
              "epochs", "batch_size", "eval_batch_size", "steps_per_epoch", "balance", "hflip", "vflip", "affine",
              "brightness_contrast", "seed", "num_threads", "image_size", "resplit", "split_seed", "bn_recalibrate")


def _common(p: argparse.ArgumentParser, backbone_default: str = "scratch:densenet121") -> None:
    p.add_argument("--config", help="YAML with any of these options (flags given here win)")
    p.add_argument("--shards", nargs="+", help="shard folders, files, globs or brace patterns (any mix of sources)")
    p.add_argument("--backbone", default=backbone_default,
                   help="RUN[/encoder.pt] | scratch[:arch] | xrv:FILE | chexnet:FILE | nih14:DIR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, help="input size (default: the backbone's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, help="torch CPU threads")
    p.add_argument("--wandb", choices=("online", "offline", "disabled"),
                   help="W&B mode (default: WANDB_MODE, else offline)")
    p.add_argument("--wandb-project", default="xray-genesis")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")


def _training(p: argparse.ArgumentParser, *, balance: str = "sampler") -> None:
    b = argparse.BooleanOptionalAction
    p.add_argument("--mode", choices=("full", "partial", "linear"), default="full",
                   help="full fine-tune, partial unfreezing (discriminative lr) or linear probe")
    p.add_argument("--head", choices=("linear", "mlp"), default="linear")
    p.add_argument("--hidden", type=int, default=256, help="MLP head width")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate")
    p.add_argument("--backbone-lr", type=float, help="full mode: backbone lr (default lr/10)")
    p.add_argument("--unfreeze", type=int, default=2, help="partial mode: deepest stages that train")
    p.add_argument("--lr-decay", type=float, default=0.3, help="partial mode: lr factor per stage downwards")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--steps-per-epoch", type=int, help="default: one pass over the training split")
    p.add_argument("--balance", choices=("sampler", "weights", "none"), default=balance,
                   help="class-balanced sampling, a class-weighted loss, or neither")
    p.add_argument("--hflip", action=b, default=True)
    p.add_argument("--vflip", action=b, default=False)
    p.add_argument("--affine", action=b, default=True, help="small rotation/scale/shift")
    p.add_argument("--brightness-contrast", action=b, default=True)
    p.add_argument("--bn-recalibrate", type=int, default=16,
                   help="batches used to re-estimate BatchNorm statistics after each epoch (0: off)")
    p.add_argument("--resplit", action="store_true",
                   help="ignore the shards' splits; stratified patient-grouped 64/16/20 split")
    p.add_argument("--split-seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="downstream.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    p = sub.add_parser("diagnosis", help="COVID-19 / pneumonia / normal classifier")
    _common(p)
    _training(p)
    p.add_argument("--scorecam-per-class", type=int, default=2, help="Score-CAM overlays per class (0: none)")
    p.add_argument("--scorecam-max-channels", type=int, default=256,
                   help="most active channels used by Score-CAM (0: all)")
    p = sub.add_parser("compare", help="diagnosis over seeds for several initialisations, mean ± sd")
    _common(p)
    _training(p)
    p.add_argument("--backbones", nargs="+", required=False,
                   help="backbone specs to compare, e.g. RUN/encoder.pt scratch:densenet121")
    p.add_argument("--names", nargs="+", help="a label per backbone (default: the specs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--scorecam-per-class", type=int, default=2,
                   help="Score-CAM overlays per class for the first seed of each initialisation (0: none)")
    p.add_argument("--scorecam-max-channels", type=int, default=256,
                   help="most active channels used by Score-CAM (0: all)")
    p = sub.add_parser("nih14", help="multi-label NIH-14 head (BCE, AUROC per finding); saves nih14:DIR")
    _common(p)
    _training(p, balance="none")
    p = sub.add_parser("severity", help="frozen-backbone regression of geographic extent and opacity")
    _common(p)
    p.add_argument("--features", default="pooled",
                   help="pooled (last stage GAP) | multiscale (GAP of every encoder stage, concatenated) | "
                        "pathologies (all outputs) | comma list, e.g. lung_opacity,pneumonia")
    p.add_argument("--regressor", choices=("ridge", "linear"), default="ridge")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0])
    p.add_argument("--targets", default="geographic_mean,opacity_mean")
    p.add_argument("--train-flips", default="h,v", help="flipped feature copies for training: h,v,hv or none")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="average test predictions over the same flips")
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse with runkit's layering inside the chosen subcommand (so --config keys are that task's flags)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in TASKS:
        parser.parse_args(argv)  # prints usage / the error
        raise UserError(f"first argument must be one of {', '.join(TASKS)}")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    args = parse_layered(sub, argv[1:])
    args.task = argv[0]
    return args


def _config(args: argparse.Namespace) -> dict:
    cfg = {k: v for k, v in vars(args).items() if k not in ("config", "out", "wandb", "wandb_project", "task")}
    if cfg.get("scorecam_max_channels") == 0:
        cfg["scorecam_max_channels"] = None
    return cfg


def run(args: argparse.Namespace) -> int:
    from runkit.tracking import Tracker

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not args.shards:
        raise UserError(f"{args.task} needs --shards")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(args, out)
    cfg = _config(args)
    if cfg.get("num_threads"):
        import torch

        torch.set_num_threads(int(cfg["num_threads"]))
    tracker = Tracker(out, cfg, mode=args.wandb, project=args.wandb_project, job_type=args.task,
                      name=f"{args.task}-{out.name}")
    try:
        files = _JOBS[args.task](cfg, out, tracker)
    finally:
        tracker.finish()
    print(f"{args.task}: wrote {out / 'metrics.json'}")
    for k, v in files.items():
        if isinstance(v, list):
            if v:
                print(f"  {k}: {len(v)} files in {Path(v[0]).parent}")
        else:
            print(f"  {k}: {v}")
    return 0


def _diagnosis(cfg: dict, out: Path, tracker) -> dict:
    from downstream import diagnosis

    result = diagnosis.train_diagnosis(cfg, log=tracker.log)
    files = diagnosis.write_outputs(result, result["data"], out, tracker)
    t = result["test"]
    print(f"test: accuracy {t['accuracy']:.3f}, balanced accuracy {t['balanced_accuracy']:.3f}, "
          f"macro-F1 {t['macro_f1']:.3f}, macro AUROC {t['macro_auroc']:.3f}")
    return files


def _severity(cfg: dict, out: Path, tracker) -> dict:
    from downstream import severity

    result, resolved = severity.run_severity(cfg)
    files = severity.write_outputs(result, resolved, out, tracker)
    print(severity.table(result))
    return files


def _nih14(cfg: dict, out: Path, tracker) -> dict:
    from downstream import nih14

    result = nih14.train_nih14(cfg, log=tracker.log)
    files = nih14.write_outputs(result, out, tracker)
    print(f"test mean AUROC {result['test']['mean_auroc']:.3f}; use it as --backbone nih14:{out}")
    return files


def _compare(cfg: dict, out: Path, tracker) -> dict:
    from downstream import compare
    from downstream.backbones import load_backbone
    from downstream.data import split_indices
    from downstream.diagnosis import load_diagnosis_data
    from downstream.metrics import to_jsonable
    from runkit.atomic import atomic_write_json, atomic_write_text

    specs = cfg.get("backbones") or []
    if len(specs) < 1:
        raise UserError("compare needs --backbones SPEC [SPEC ...]")
    names = cfg.get("names") or specs
    if len(names) != len(specs):
        raise UserError(f"--names has {len(names)} labels for {len(specs)} backbones")
    if len({compare.file_label(n) for n in names}) != len(names):
        raise UserError(f"--names {names} are not distinct as file names; give each initialisation its own label")
    size = cfg.get("image_size") or load_backbone(specs[0]).image_size
    data = load_diagnosis_data(cfg["shards"], int(size))
    splits = split_indices(data, seed=int(cfg["split_seed"]), resplit=bool(cfg["resplit"]))
    train_cfg = {k: cfg[k] for k in TRAIN_KEYS if k in cfg}
    train_cfg.update(image_size=int(size), progress=cfg.get("progress", True), scorecam_per_class=0)

    def on_run(name, seed, row):
        tracker.log({f"{name}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        print(f"  {name} seed {seed}: macro-F1 {row['macro_f1']:.3f}, balanced accuracy "
              f"{row['balanced_accuracy']:.3f}")

    figures = {}

    def on_result(name, seed, res):
        if seed == cfg["seeds"][0]:
            figures[name] = compare.write_run_figures(name, res, data, out,
                                                      per_class=int(cfg.get("scorecam_per_class") or 0),
                                                      max_channels=cfg.get("scorecam_max_channels"))

    result = compare.compare_initialisations(train_cfg, specs, cfg["seeds"], data=data, splits=splits, names=names,
                                             on_run=on_run, on_result=on_result)
    text = compare.table(result)
    print(text)
    files = {"table": str(atomic_write_text(out / "compare_table.md", text + "\n"))}
    for name, f in figures.items():
        files[f"confusion_{compare.file_label(name)}"] = f["confusion"]
        files[f"scorecam_{compare.file_label(name)}"] = f["scorecam"]
    atomic_write_json(out / "metrics.json", to_jsonable({"task": "compare", **result, "files": files}))
    return files


_JOBS = {"diagnosis": _diagnosis, "severity": _severity, "nih14": _nih14, "compare": _compare}
