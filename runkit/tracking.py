"""Run tracking shared by pretrain, downstream and tune: RUN/metrics.jsonl plus Weights & Biases.

W&B is optional and never needs a key: with no WANDB_API_KEY the default mode is offline, which writes
RUN/wandb/offline-run-* for a later `wandb sync`. Only rank 0 logs; other ranks get a no-op tracker.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from runkit.config import scrub_secrets, to_plain

WANDB_MODES = ("online", "offline", "disabled")


def default_wandb_mode() -> str:
    """WANDB_MODE if set, else online with a key and offline without one (never an error for a missing key)."""
    env = os.environ.get("WANDB_MODE")
    if env in WANDB_MODES:
        return env
    return "online" if _has_wandb_login() else "offline"


def _has_wandb_login() -> bool:
    """A key in the environment, or one `wandb login` stored in ~/.netrc (never read into our logs)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


RUN_ID_FILE = "wandb_run_id.txt"


def persistent_run_id(out_dir: str | Path) -> str:
    """The W&B run id of a run folder: made on the first start, reused by every restart (a requeued SLURM
    job stays one W&B run). Call on rank 0 only."""
    import uuid

    from runkit.atomic import atomic_write_text

    path = Path(out_dir) / RUN_ID_FILE
    try:
        rid = path.read_text().strip()
        if rid:
            return rid
    except OSError:
        pass
    rid = uuid.uuid4().hex[:12]
    atomic_write_text(path, rid + "\n")
    return rid


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Tracker:
    """Append-only JSON lines in the run folder, mirrored to W&B when enabled."""

    def __init__(self, out_dir: str | Path, config: Any = None, *, enabled: bool = True,
                 project: str = "xray-genesis", group: str | None = None, name: str | None = None,
                 mode: str | None = None, job_type: str | None = None, resume_id: str | None = None,
                 jsonl_name: str = "metrics.jsonl"):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.mode = mode or default_wandb_mode()
        if self.mode not in WANDB_MODES:
            raise ValueError(f"wandb mode {self.mode!r} is not one of {WANDB_MODES}")
        self._wandb_run = None
        self._jsonl = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / jsonl_name, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if self.mode != "disabled":
            import wandb  # heavy, and optional at run time

            if self.mode == "online" and not _has_wandb_login():
                # online with no key would prompt or raise without a TTY; never block a run on it
                print("tracking: no W&B key (WANDB_API_KEY or `wandb login`); logging offline instead "
                      "(`wandb sync` uploads the run later)", file=sys.stderr, flush=True)
                self.mode = "offline"
            self._wandb_run = wandb.init(
                project=project, group=group, name=name, job_type=job_type, dir=str(self.out_dir),
                mode=self.mode, config=scrub_secrets(to_plain(config)) if config is not None else None,
                id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous",
            )

    @property
    def wandb_run(self):
        return self._wandb_run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3)}
        if step is not None:
            row["step"] = int(step)
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in metrics.items()}, step=step)

    def log_image(self, name: str, path: str | Path, step: int | None = None, caption: str | None = None) -> None:
        if not self.enabled or self._wandb_run is None:
            return
        import wandb

        self._wandb_run.log({name: wandb.Image(str(path), caption=caption)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._wandb_run is not None:
            for k, v in values.items():
                self._wandb_run.summary[k] = _jsonable(v)

    def finish(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (from a kill) is ignored rather than fatal."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
