"""manifest.json and the per-shard sidecar state it is merged from.

Each finished shard `<split>-NNNNNN.tar` gets a sidecar `.state/<split>-NNNNNN.json` holding its
checksum, label counts and skipped inputs. Sidecars make a build resumable after kill -9 (a shard is
kept only when its sidecar exists, matches the build, and the tar's sha256 matches) and let N
machines build parts of one data set: the manifest is a pure function of the sidecars and the scan,
with no wall-clock values, so a resumed or merged build is byte-identical to a clean one.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from runkit.atomic import atomic_write_text
from runkit.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "xray-shards/1"
STATE_DIR = ".state"
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
UNKNOWN = "unknown"
NO_FINDING = "No Finding"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def dumps(obj: Any) -> str:
    """The one JSON spelling used for manifest and sidecars, so equal content means equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def label_counts(records: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Counts per diagnosis and per NIH finding ([] counts as 'No Finding', None as 'unknown').

    Sources with their own labels also get `source_labels` (images where the label is 1) and
    `source_labels_unknown` (images where it is blank or uncertain-ignored); those groups are absent
    for sources without own labels.
    """
    diagnosis: Counter = Counter()
    findings: Counter = Counter()
    own: Counter = Counter()
    own_unknown: Counter = Counter()
    has_own = False
    severity = 0
    for rec in records:
        sl = rec.get("labels", {}).get("source_labels")
        if sl is not None:
            has_own = True
            own.update(k for k, v in sl.items() if v == 1)
            own_unknown.update(k for k, v in sl.items() if v is None)
        labels = rec.get("labels", {})
        diagnosis[labels.get("diagnosis") or UNKNOWN] += 1
        f = labels.get("findings")
        if f is None:
            findings[UNKNOWN] += 1
        elif not f:
            findings[NO_FINDING] += 1
        else:
            findings.update(f)
        severity += labels.get("severity") is not None
    out = {"diagnosis": dict(diagnosis), "findings": dict(findings), "severity": {"scored": severity}}
    if has_own:
        out["source_labels"] = dict(own)
        out["source_labels_unknown"] = dict(own_unknown)
    return out


def merge_counts(parts: Iterable[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for part in parts:
        for group, counts in part.items():
            out.setdefault(group, Counter()).update(counts)
    return {group: dict(sorted(c.items())) for group, c in sorted(out.items())}


def sidecar_path(out_dir: Path, name: str) -> Path:
    return out_dir / STATE_DIR / (name[: -len(".tar")] + ".json")


def write_sidecar(out_dir: Path, state: dict) -> None:
    atomic_write_text(sidecar_path(out_dir, state["name"]), dumps(state))


def read_sidecar(out_dir: Path, name: str) -> dict | None:
    path = sidecar_path(out_dir, name)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def build_manifest(*, source: str, options: dict, version: str, states: list[dict],
                   scan_skipped: list[dict]) -> dict:
    """Merge the sidecars (in shard order) and the scan's skips into the manifest dict."""
    shards = [{k: s[k] for k in ("name", "split", "count", "sha256", "bytes")} for s in states]
    splits: dict[str, dict] = {}
    for split in sorted({s["split"] for s in states}):
        mine = [s for s in states if s["split"] == split]
        splits[split] = {
            "shards": len(mine),
            "samples": sum(s["count"] for s in mine),
            "labels": merge_counts(s["labels"] for s in mine),
        }
    skipped = list(scan_skipped) + [dict(k, stage="build") for s in states for k in s["skipped"]]
    return {
        "encoding": encoding_cost(options.get("encoding", "png"), states),
        "format": MANIFEST_FORMAT,
        "version": version,
        "source": source,
        "options": options,
        "totals": {
            "shards": len(shards),
            "samples": sum(s["count"] for s in shards),
            "skipped": len(skipped),
            "bytes": sum(s["bytes"] for s in shards),
        },
        "splits": splits,
        "shards": shards,
        "skipped_by_reason": dict(sorted(Counter(reason_kind(s["reason"]) for s in skipped).items())),
        "skipped": skipped,
    }


def encoding_cost(encoding: str, states: list[dict]) -> dict:
    """The image encoding and what it costs on disk: tar bytes per image, and per byte of raw pixels."""
    samples = sum(s["count"] for s in states)
    nbytes = sum(s["bytes"] for s in states)
    pixels = sum(s["pixel_bytes"] for s in states) if all("pixel_bytes" in s for s in states) else 0  # older sidecars
    return {"name": encoding, "bytes_per_image": round(nbytes / samples, 1) if samples else None,
            "bytes_per_pixel_byte": round(nbytes / pixels, 4) if pixels else None}


def reason_kind(reason: str) -> str:
    """The reason's category, for summaries: the text before the first ':'."""
    return reason.split(":", 1)[0].strip() or reason


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    return atomic_write_text(Path(out_dir) / MANIFEST_NAME, dumps(manifest))


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no {MANIFEST_NAME} in {out_dir} (build it with `python -m shards build`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: unknown manifest format {manifest.get('format')!r}, want {MANIFEST_FORMAT}")
    return manifest
