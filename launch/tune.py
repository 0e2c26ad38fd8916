"""Ray Tune sweeps over the downstream heads, logged to W&B (see downstream/tuning.py).

    python launch/tune.py severity  --shards S --backbone xrv:FILE --space launch/configs/tune_severity.yaml \\
        --num-samples 100 --out OUT
    python launch/tune.py diagnosis --shards S --backbone RUN/encoder.pt --space launch/configs/tune_diagnosis.yaml \\
        --num-samples 20 --scheduler asha --grace-period 2 --cpus-per-trial 2 --out OUT
    python launch/tune.py severity --out OUT --resume          # continue an interrupted sweep
    python launch/tune.py diagnosis ... --address auto         # on a Ray cluster started with `ray start`

Writes OUT/results.csv, OUT/best.json, OUT/trials.png, OUT/trials/<id>/ (metrics.jsonl, wandb/) and
OUT/ray/<name>/ (Tune's experiment folder, what --resume restores).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from runkit.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune.py", description=__doc__.splitlines()[0])
    p.add_argument("task", choices=("diagnosis", "severity"))
    p.add_argument("--shards", nargs="+", help="shard folders, files, globs or brace patterns")
    p.add_argument("--backbone", default="scratch:densenet121",
                   help="RUN[/encoder.pt] | scratch[:arch] | xrv:FILE | chexnet:FILE | nih14:DIR")
    p.add_argument("--space", help="search-space YAML (default: launch/configs/tune_<task>.yaml)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override or add a space entry (YAML value), e.g. --set features=pooled")
    p.add_argument("--num-samples", type=int, default=8, help="trials (times the size of any grid)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs (diagnosis) or folds (severity)")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor")
    p.add_argument("--search", choices=("random", "optuna"), default="random")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0)
    p.add_argument("--num-cpus", type=int, help="CPUs a local Ray may use (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs a local Ray may use (default: 0)")
    p.add_argument("--address", help="join a running Ray cluster (`ray start --head`; 'auto' or HOST:PORT)")
    p.add_argument("--max-failures", type=int, default=1, help="retries per trial before it counts as errored")
    p.add_argument("--image-size", type=int, help="input size (default: the backbone's own)")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--name", help="sweep name = W&B group (default: <task>-<OUT folder name>)")
    p.add_argument("--no-share-features", dest="share_features", action="store_false",
                   help="recompute frozen features in every trial (for comparison; slower)")
    p.add_argument("--resplit", action="store_true", help="ignore the shards' splits (patient-grouped 64/16/20)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", required=True, help="sweep folder")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in OUT")
    p.add_argument("--wandb-project", default="xray-genesis")
    p.add_argument("--wandb-mode", choices=("online", "offline", "disabled"),
                   help="default: WANDB_MODE, else online with a key, else offline")
    p.add_argument("--verbose", type=int, default=1, help="0 silent, 1 Tune status table, 2 also trial logs")
    return p


@exit_on_user_error
def main(argv=None) -> int:
    from downstream.tuning import SweepSettings, run_sweep

    a = build_parser().parse_args(argv)
    space = a.space or str(_HERE / "configs" / f"tune_{a.task}.yaml")
    settings = SweepSettings(
        task=a.task, shards=a.shards or [], backbone=a.backbone, space=space, out=a.out, overrides=a.overrides,
        num_samples=a.num_samples, scheduler=a.scheduler, search=a.search, grace_period=a.grace_period,
        reduction_factor=a.reduction_factor, max_failures=a.max_failures, cpus_per_trial=a.cpus_per_trial,
        gpus_per_trial=a.gpus_per_trial, image_size=a.image_size, seed=a.seed, name=a.name,
        share_features=a.share_features, wandb_project=a.wandb_project, wandb_mode=a.wandb_mode,
        split_seed=a.split_seed, resplit=a.resplit)
    result = run_sweep(settings, out=a.out, resume=a.resume, address=a.address, num_cpus=a.num_cpus,
                       num_gpus=a.num_gpus, verbose=a.verbose)
    best, files = result["best"], result["files"]
    out = Path(a.out).resolve()
    print(f"best trial {best['trial_id']}: {best['metric']} {best['validation'][best['metric']]:.4f} (validation)"
          + (f", test {_test_line(best)}" if best.get("test") else ""))
    print(f"results: {files['results']}\nbest:    {files['best']}\nplot:    {files['plot']}\n"
          f"trials:  {out / 'trials'} (metrics.jsonl, wandb/)\nray:     {result['experiment_path']}")
    return 0


def _test_line(best: dict) -> str:
    t = best["test"]
    if "macro_f1" in t:
        return f"macro_f1 {t['macro_f1']:.4f}, accuracy {t['accuracy']:.4f}"
    return f"mse {t['mse']:.4f}"


if __name__ == "__main__":
    sys.exit(main())
