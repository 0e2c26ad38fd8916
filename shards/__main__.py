"""`python -m shards synth | build | inspect | dedupe`: each subcommand lives in its own module.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from runkit.errors import exit_on_user_error

SUBCOMMANDS = {
    "synth": ("shards.synth", "write phantom chest X-ray data sets in the NIH and ieee8023 formats"),
    "build": ("shards.writer", "turn a raw data set into WebDataset shards plus manifest.json"),
    "inspect": ("shards.inspect", "print counts per split and label, and verify shard checksums"),
    "dedupe": ("shards.dedupe", "find images whose pixels appear in several shard folders"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
