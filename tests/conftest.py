"""Shared fixtures: phantom data sets are made once per session, small, in a temp folder."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# The venv's bin first, as an activated venv (and launch/configs/pretrain.slurm) has it: DeepSpeed's CPU
# ops are JIT-built with whichever `ninja` is first on PATH, and the venv's ninja (1.13) and the system's
# (1.11) write incompatible build logs, so mixing them rebuilds the op (40-300 s) at every switch.
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
