"""Ray Tune sweeps over the downstream heads, logged to W&B (see downstream/tuning.py).

    python launch/tune.py severity  --shards S --backbone xrv:FILE --space launch/configs/tune_severity.yaml \\
        --num-samples 100 --out OUT
    python launch/tune.py diagnosis --shards S --backbone RUN/encoder.pt --space launch/configs/tune_diagnosis.yaml \\
        --num-samples 20 --scheduler asha --grace-period 2 --cpus-per-trial 2 --out OUT
    python launch/tune.py severity --out OUT --resume          # continue an interrupted sweep
    python launch/tune.py diagnosis ... --address auto         # on a Ray cluster started with `ray start`
    python launch/tune.py severity ... --gpus-per-trial 0.25 --device cuda   # trials on the GPUs Ray gives them

Every flag is a field of downstream.config.SweepConfig; `--config FILE.yaml` takes the same keys.
The default space fits the backbone: named-output features are left out (and reported) for backbones
without named outputs (scratch, RUN/encoder.pt).

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
    """Flags of downstream.config.SweepConfig (one per field), plus what a single invocation needs."""
    from downstream.config import SweepConfig
    from runkit.typed import add_arguments

    p = argparse.ArgumentParser(prog="tune.py", description=__doc__.splitlines()[0])
    p.add_argument("task", choices=("diagnosis", "severity"))
    p.add_argument("--config", help="YAML with any of these options (flags given here win)")
    p.add_argument("--out", required=True, help="sweep folder")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override or add a space entry (YAML value), e.g. --set features=pooled")
    add_arguments(p, SweepConfig)
    p.add_argument("--num-cpus", type=int, help="CPUs a local Ray may use (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs a local Ray may use (default: all it finds)")
    p.add_argument("--address", help="join a running Ray cluster (`ray start --head`; 'auto' or HOST:PORT)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in OUT")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                   help="0 silent, 1 Tune status table, 2 also trial logs")
    return p


@exit_on_user_error
def main(argv=None) -> int:
    from downstream.config import SweepConfig
    from downstream.sweep import run_sweep
    from runkit.typed import parse_layered

    a = parse_layered(build_parser(), argv)
    space = a.space or str(_HERE / "configs" / f"tune_{a.task}.yaml")
    values = {k: v for k, v in vars(a).items() if k in SweepConfig.field_map()}
    settings = SweepConfig.from_dict({**values, "space": space, "out": a.out}, "tune options")
    result = run_sweep(settings, out=a.out, resume=a.resume, address=a.address, num_cpus=a.num_cpus,
                       num_gpus=a.num_gpus, verbose=a.verbose)
    best, files = result["best"], result["files"]
    out = Path(a.out).resolve()
    print(f"best trial {best['trial_id']}: {best['metric']} {best['validation'][best['metric']]:.4f} (validation)"
          + (f", test {_test_line(best)}" if best.get("test") else ""))
    if result.get("left_out"):
        print(f"left out of the space (backbone has no named outputs): features {result['left_out']}")
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
