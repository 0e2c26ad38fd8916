"""Which DeepSpeed checkpoint tags are complete, pruning old ones, and surviving a failed write.

DeepSpeed writes a tag folder file by file; a kill -9 between files (or a full disk) can leave a tag folder
that looks present but is not loadable. After every rank's `save_checkpoint` returns and a barrier passes,
rank 0 writes `<tag>/COMPLETE.json` listing every file with its size, then `latest` (DeepSpeed is asked
not to write its own, which it would write before the marker). Resume considers only tags whose marker
exists and whose files all still have those sizes, newest first; `latest` is ignored.

A write that fails inside DeepSpeed's save (`catch_write_errors`) is recorded instead of raised, so the
failing rank still takes part in the rest of the save's collectives and the ranks can agree to skip it.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

from runkit.atomic import atomic_write_json, atomic_write_text

# What a failed file write raises: OSError from Python's own writes (ENOSPC, EIO, EFBIG, ...) and
# RuntimeError from torch.save's C++ zip writer ("PytorchStreamWriter failed writing file ...",
# "unexpected pos ...", "write(): fd N failed with ...") -- the latter is what a full disk gives
# inside DeepSpeed's default (zip) serialization.
WRITE_ERRORS = (OSError, RuntimeError)

MARKER = "COMPLETE.json"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def mark_complete(ckpt_dir: str | Path, tag: str, info: dict) -> Path:
    """Record the files of a finished tag; written last, atomically, by rank 0 after a barrier."""
    d = Path(ckpt_dir) / tag
    files = {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != MARKER and not p.name.startswith(".")}
    if not files:
        raise OSError(f"checkpoint {d} holds no files")
    marker = atomic_write_json(d / MARKER, {**info, "tag": tag, "files": files})
    atomic_write_text(Path(ckpt_dir) / "latest", tag)  # for DeepSpeed's own tools (zero_to_fp32.py)
    return marker


def verify(ckpt_dir: str | Path, tag: str) -> dict | None:
    """The marker's content if the tag is complete and intact, else None."""
    d = Path(ckpt_dir) / tag
    try:
        info = json.loads((d / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for rel, size in info.get("files", {}).items():
        p = d / rel
        if not p.is_file() or p.stat().st_size != size:
            return None
    return info if info.get("files") else None


def complete_tags(ckpt_dir: str | Path) -> list[tuple[int, str, dict]]:
    """(step, tag, marker) of every intact checkpoint, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        step = tag_step(p.name)
        if step is None or not p.is_dir():
            continue
        info = verify(d, p.name)
        if info is not None:
            out.append((step, p.name, info))
    return sorted(out)


def latest_complete(ckpt_dir: str | Path) -> tuple[int, str, dict] | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def prune(ckpt_dir: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete tags, and incomplete tags older than the newest one."""
    d = Path(ckpt_dir)
    tags = complete_tags(d)
    if not tags:
        return []
    keep = {t for _, t, _ in tags[-max(1, keep_last):]}
    newest = tags[-1][0]
    removed = []
    for p in d.iterdir():
        step = tag_step(p.name)
        if step is None or p.name in keep or not p.is_dir():
            continue
        if step < newest:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return sorted(removed)


def remove_partial(ckpt_dir: str | Path, tag: str) -> None:
    """Drop a tag whose save failed (e.g. disk full), so it never shadows the previous complete one."""
    p = Path(ckpt_dir) / tag
    if p.is_dir() and verify(ckpt_dir, tag) is None:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def catch_write_errors(engine):
    """Around `engine.save_checkpoint` on every rank: yields a list that gets the first write error.

    DeepSpeed's save has collectives after its file writes (a barrier at the end). A write error raised
    out of it on one rank would send that rank to the next collective of the caller while the others
    wait in DeepSpeed's barrier: a hang, or collectives paired wrongly. So the writing calls it makes --
    the checkpoint engine's `save` and `makedirs`, and the recovery-script copy of ZeRO -- record a
    WRITE_ERRORS instead of raising it and skip the rest of this rank's writes; the save then runs its
    collectives as on every other rank, and the caller all-reduces whether any rank failed."""
    errors: list[BaseException] = []
    patched = []

    def guard(fn):
        def guarded(*a, **kw):
            if errors:
                return None  # this checkpoint is lost already: write nothing more of it
            try:
                return fn(*a, **kw)
            except WRITE_ERRORS as exc:
                errors.append(exc)
                return None
        return guarded

    for obj, name in ((engine.checkpoint_engine, "save"), (engine.checkpoint_engine, "makedirs"),
                      (engine, "_copy_recovery_script")):
        fn = getattr(obj, name, None)
        if fn is not None:
            patched.append((obj, name, name in vars(obj), fn))
            setattr(obj, name, guard(fn))
    try:
        yield errors
    finally:
        for obj, name, shadowed, fn in reversed(patched):
            if shadowed:
                setattr(obj, name, fn)
            else:
                delattr(obj, name)
