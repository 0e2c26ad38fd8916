"""Run tracking shared by pretrain, downstream and tune: RUN/metrics.jsonl plus Weights & Biases.

W&B is optional and never needs a key. It goes online only when asked: `WANDB_API_KEY` in the environment,
an explicit mode "online" (`--wandb-mode online`, `--wandb online`, `wandb_mode: online`) or
`WANDB_MODE=online`. A `wandb login` stored in ~/.netrc is not a request: without one of these the mode
is offline, which writes RUN/wandb/offline-run-* for a later `wandb sync`. Images (validation grids,
confusion matrices) go to W&B only when the run is online; offline runs keep them in the run folder only,
so a later `wandb sync` uploads no image nobody asked to upload. Only rank 0 logs; other ranks get a
no-op tracker. Everything sent to W&B or written to metrics.jsonl passes `runkit.redact` first.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from runkit.config import to_plain
from runkit.redact import redact, redact_stdio, redacted_argv, scrub_secrets

WANDB_MODES = ("online", "offline", "disabled")


def default_wandb_mode() -> str:
    """WANDB_MODE if set, else online with WANDB_API_KEY and offline without (a ~/.netrc login is no request)."""
    env = os.environ.get("WANDB_MODE")
    if env in WANDB_MODES:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _has_wandb_login() -> bool:
    """A key in the environment, or one `wandb login` stored in ~/.netrc: what an explicit "online" can use."""
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
    if isinstance(v, str):
        return redact(v)
    return v


def cut_torn_tail(path: str | Path) -> None:
    """Make a JSON-lines file end at a line end before appending to it.

    A kill in the middle of a write leaves a last line without its newline; appending to it would join
    the next row to the fragment and lose both. A fragment that is not a whole JSON value is cut off;
    a whole row that only misses its newline gets one."""
    try:
        f = open(path, "r+b")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start, block = size, 1 << 16
        while start > 0:  # find the last newline, reading backwards
            lo = max(0, start - block)
            f.seek(lo)
            nl = f.read(start - lo).rfind(b"\n")
            if nl >= 0:
                start = lo + nl + 1
                break
            start = lo
        f.seek(start)
        tail = f.read()
        try:
            json.loads(tail)
        except ValueError:
            f.truncate(start)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")


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
        cut_torn_tail(self.out_dir / jsonl_name)
        self._jsonl = open(self.out_dir / jsonl_name, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if self.mode != "disabled":
            import wandb  # heavy, and optional at run time

            if self.mode == "online" and not _has_wandb_login():
                # online with no key would prompt or raise without a TTY; never block a run on it
                print("tracking: no W&B key (WANDB_API_KEY or `wandb login`); logging offline instead "
                      "(`wandb sync` uploads the run later)", file=sys.stderr, flush=True)
                self.mode = "offline"
            redact_stdio()  # W&B copies the console (output.log): it must see redacted text
            with redacted_argv():  # W&B records sys.argv at init
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
            self._wandb_run.log({k: redact(v) if isinstance(v, str) else v for k, v in metrics.items()}, step=step)

    def log_image(self, name: str, path: str | Path, step: int | None = None, caption: str | None = None) -> None:
        """Send an image to W&B, only when the run is online (images may show patients: an offline run
        folder, which `wandb sync` would upload later, gets none; the file stays in the run folder)."""
        if not self.enabled or self._wandb_run is None or self.mode != "online":
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
