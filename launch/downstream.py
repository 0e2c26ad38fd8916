"""Downstream jobs on a pretrained (or scratch, xrv, CheXNet, NIH-14) backbone.

    python launch/downstream.py diagnosis --shards DIR [DIR ...] --backbone RUN/encoder.pt --out OUT [--config y.yaml]
    python launch/downstream.py compare   --shards ... --backbones RUN/encoder.pt scratch:densenet121 --seeds 0 1 2 --out OUT
    python launch/downstream.py severity  --shards DIR --backbone xrv:FILE --features lung_opacity --out OUT
    python launch/downstream.py nih14     --shards NIH_DIR --backbone RUN/encoder.pt --out OUT   # then nih14:OUT
    python launch/downstream.py severity-protocol --config launch/configs/protocol_seed000.yaml \
        --shards SEV_DIR --backbone xrv:FILE --out OUT                                    # seed 000's table
    python launch/downstream.py compare --config launch/configs/protocol_seed004.yaml \
        --shards DIR [DIR ...] --backbones RUN/encoder.pt scratch:densenet121 --out OUT   # seed 004

Every job takes --device auto|cpu|cuda[:i] and --config FILE.yaml (keys = the task's flags, validated
like them). Each writes OUT/metrics.json, OUT/config.yaml and its PNGs. The options of each task are the
fields of its dataclass in downstream/config.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Put the repo root (not launch/) on the path, so this works in a checkout that is not pip-installed.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from downstream.cli import parse, run
from runkit.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> int:
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
