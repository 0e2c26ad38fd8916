"""Models Genesis pretraining entry point.

    deepspeed [--num_gpus N | --hostfile H] launch/pretrain.py --train-shards GLOB --val-shards GLOB \
        --out RUN --deepspeed_config launch/configs/ds_zero2_bf16.json [--config exp.yaml] [...]
    python launch/pretrain.py ...          # one process, no launcher

Rerunning with the same --out resumes from the last complete checkpoint. See pretrain/engine.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

# This script is named like the package it drives: put the repo root, not launch/, on the path so that
# `pretrain` is the package (also in a checkout that is not pip-installed).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from pretrain.engine import build_parser, run
from runkit.errors import exit_on_user_error
from runkit.typed import parse_layered


@exit_on_user_error
def main(argv=None) -> int:
    return run(parse_layered(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
