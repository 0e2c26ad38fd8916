"""YAML loading and the resolved config saved with the git SHA (credentials scrubbed: runkit.redact).

The layering itself (defaults, then a YAML `--config`, then flags, with YAML values validated like flags)
is `runkit.typed.parse_layered`.
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

import yaml

from runkit.atomic import atomic_write_text
from runkit.errors import UserError
from runkit.redact import scrub_secrets  # every config written goes through it (also imported from here)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value, not {type(data).__name__}")
    return data


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The commit of the code that ran, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=cwd or Path(__file__).resolve().parent, capture_output=True, text=True, check=False)
    return sha + ("-dirty" if dirty.stdout.strip() else "")


def to_plain(obj: Any) -> Any:
    """Namespace/Path/tuple -> YAML-safe builtins."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_resolved(config: argparse.Namespace | dict, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config plus the git SHA into the run folder."""
    data = scrub_secrets(to_plain(config))
    data = {**data, "git_sha": git_sha()}
    return atomic_write_text(Path(out_dir) / name, yaml.safe_dump(data, sort_keys=False))
