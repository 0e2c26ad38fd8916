"""`launch/downstream.py {diagnosis,severity,nih14,compare,severity-protocol}`: argument parsing and one job
per subcommand.

Each task's flags derive from its config dataclass (downstream.config), so the flags, the YAML keys of
`--config FILE.yaml` and the search-space keys are one list. Layering is runkit.typed's: defaults in the
dataclass, then the YAML (each value checked like its flag: a bad type, choice or range exits 2 with one
line), then flags. Every job writes OUT/config.yaml, OUT/metrics.json, OUT/metrics.jsonl and its PNGs,
and prints where.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from downstream.config import (
    CompareConfig,
    DiagnosisConfig,
    NIH14Config,
    SeverityConfig,
    SeverityProtocolConfig,
)
from runkit.config import save_resolved
from runkit.errors import UserError
from runkit.typed import add_arguments, parse_layered

CONFIGS = {"diagnosis": DiagnosisConfig, "severity": SeverityConfig, "nih14": NIH14Config,
           "compare": CompareConfig, "severity-protocol": SeverityProtocolConfig}
TASKS = tuple(CONFIGS)
HELP = {"diagnosis": "COVID-19 / pneumonia / normal classifier",
        "severity": "frozen-backbone regression of geographic extent and opacity",
        "nih14": "multi-label NIH-14 head (BCE, AUROC per finding), streamed; saves nih14:DIR",
        "compare": "diagnosis over seeds for several initialisations, mean ± sd (seed 004's protocol)",
        "severity-protocol": "seed 000's table: feature sets x flips x 8:2 and 50/50 splits, vs the mean predictor"}
INFRA = ("config", "out", "wandb", "wandb_project", "task")


def _infra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML with any of these options (flags given here win)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--wandb", choices=("online", "offline", "disabled"),
                   help="W&B mode (default: WANDB_MODE, else offline)")
    p.add_argument("--wandb-project", default="xray-genesis")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="downstream.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    for task, cls in CONFIGS.items():
        p = sub.add_parser(task, help=HELP[task])
        _infra(p)
        add_arguments(p, cls)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse with layering inside the chosen subcommand (so --config keys are that task's keys)."""
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
    """The task's validated config (ranges and cross-field checks included), device resolved once here."""
    from downstream.device import parse_device

    cfg = CONFIGS[args.task].from_namespace(args, f"{args.task} options").to_dict()
    cfg["device"] = str(parse_device(cfg["device"]))
    return cfg


def run(args: argparse.Namespace) -> int:
    from runkit.tracking import Tracker

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not args.shards:
        raise UserError(f"{args.task} needs --shards")
    cfg = _config(args)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved({**vars(args), "device": cfg["device"]}, out)
    print(f"{args.task}: device {cfg['device']}")
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
    import numpy as np

    from downstream import compare
    from downstream.backbones import load_backbone
    from downstream.data import DIAGNOSIS_CLASSES, diagnosis_target
    from downstream.streaming import prepare_sets
    from runkit.atomic import atomic_write_json, atomic_write_text
    from runkit.jsonsafe import to_jsonable

    specs = cfg.get("backbones") or []
    if len(specs) < 1:
        raise UserError("compare needs --backbones SPEC [SPEC ...]")
    names = cfg.get("names") or specs
    if len(names) != len(specs):
        raise UserError(f"--names has {len(names)} labels for {len(specs)} backbones")
    if len({compare.file_label(n) for n in names}) != len(names):
        raise UserError(f"--names {names} are not distinct as file names; give each initialisation its own label")
    size = cfg.get("image_size") or load_backbone(specs[0]).image_size
    data, splits = prepare_sets(cfg, diagnosis_target, int(size), "diagnosis shards")
    train_cfg = {k: v for k, v in cfg.items() if k not in ("backbones", "names", "seeds")}
    train_cfg.update(image_size=int(size), scorecam_per_class=0)
    counts = {s: np.bincount(data.targets[splits[s]], minlength=len(DIAGNOSIS_CLASSES)).tolist() for s in splits}
    print("split (patient-grouped): " + ", ".join(f"{s} {sum(c)} ({'/'.join(map(str, c))})" for s, c in counts.items())
          + f" images of {'/'.join(DIAGNOSIS_CLASSES)}")

    def on_run(name, seed, row):
        tracker.log({f"{name}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        print(f"  {name} seed {seed}: macro-F1 {row['macro_f1']:.3f}, balanced accuracy "
              f"{row['balanced_accuracy']:.3f}")

    figures = {}

    def on_result(name, seed, res):
        if seed == cfg["seeds"][0]:
            figures[name] = compare.write_run_figures(name, res, data, out,
                                                      per_class=int(cfg.get("scorecam_per_class") or 0),
                                                      max_channels=cfg.get("scorecam_max_channels") or None)

    result = compare.compare_initialisations(train_cfg, specs, cfg["seeds"], data=data, splits=splits, names=names,
                                             on_run=on_run, on_result=on_result)
    text = compare.table(result) + "\n\nsplit (patient-grouped): " + ", ".join(
        f"{s} {sum(c)} ({'/'.join(map(str, c))})" for s, c in counts.items()) + f" images of {'/'.join(DIAGNOSIS_CLASSES)}"
    print(text)
    files = {"table": str(atomic_write_text(out / "compare_table.md", text + "\n"))}
    for name, f in figures.items():
        files[f"confusion_{compare.file_label(name)}"] = f["confusion"]
        files[f"scorecam_{compare.file_label(name)}"] = f["scorecam"]
    atomic_write_json(out / "metrics.json", to_jsonable({"task": "compare", **result, "counts": counts,
                                                         "per_class": cfg.get("per_class"), "files": files}))
    return files


def _severity_protocol(cfg: dict, out: Path, tracker) -> dict:
    from downstream import protocols

    result = protocols.run_severity_protocol(cfg)
    files = protocols.write_severity_protocol(result, out, tracker)
    print(protocols.severity_protocol_table(result))
    return files


_JOBS = {"diagnosis": _diagnosis, "severity": _severity, "nih14": _nih14, "compare": _compare,
         "severity-protocol": _severity_protocol}
