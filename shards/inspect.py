"""`python -m shards inspect DIR`: counts per split and label, and a sha256 check of every shard.

Exit 0 when every shard in manifest.json is present and matches its checksum and size, 1 otherwise
(each bad shard named on stderr), 2 when there is no readable manifest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from runkit.errors import UserError
from shards import manifest as mf
from shards.record import SPLITS


def verify(out_dir: str | Path, manifest: dict, progress: bool = True) -> list[str]:
    """Problems found, one line per bad shard (missing, wrong size, wrong sha256); [] when all good."""
    out = Path(out_dir)
    problems = []
    for shard in tqdm(manifest["shards"], desc="verify", unit=" shards", disable=not progress, file=sys.stderr,
                      leave=False):
        path = out / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{shard['name']}: {size} bytes, manifest says {shard['bytes']}")
        elif mf.sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 mismatch")
    return problems


def format_counts(manifest: dict) -> str:
    lines = [(f"{manifest['source']} shards (format {manifest['format']}, version {manifest['version']}, "
              f"options {manifest['options']})")]
    splits = sorted(manifest["splits"], key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    for split in splits:
        info = manifest["splits"][split]
        lines.append(f"{split}: {info['samples']} samples in {info['shards']} shards")
        for group, counts in info["labels"].items():
            text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"  {group}: {text}")
    totals = manifest["totals"]
    lines.append(f"total: {totals['samples']} samples, {totals['shards']} shards, {totals['bytes'] / 1e6:.1f} MB, "
                 f"{totals['skipped']} inputs skipped")
    enc = manifest.get("encoding") or {"name": "png"}  # manifests from before encodings are PNG
    if enc.get("bytes_per_image"):
        ratio = f", {enc['bytes_per_pixel_byte']:.2f} bytes per pixel byte" if enc.get("bytes_per_pixel_byte") else ""
        lines.append(f"encoding: {enc['name']}, {enc['bytes_per_image'] / 1e3:.1f} kB per image on disk{ratio}")
    else:
        lines.append(f"encoding: {enc['name']}")
    for reason, n in manifest["skipped_by_reason"].items():
        lines.append(f"  skipped {n}: {reason}")
    dup = manifest.get("duplicates")
    if dup and dup.get("groups"):
        lines.append(f"duplicates inside this source (same pixels): {dup['groups']} groups, {dup['images']} images")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="shard folder holding manifest.json")
    parser.add_argument("--no-verify", action="store_true", help="only print counts, skip the sha256 check")


def run(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if not out.is_dir():
        raise UserError(f"{out}: no such folder")
    manifest = mf.load_manifest(out)
    print(format_counts(manifest))
    if args.no_verify:
        return 0
    problems = verify(out, manifest)
    for p in problems:
        print(f"BAD {p}", file=sys.stderr)
    n = len(manifest["shards"])
    if problems:
        print(f"checksums: {len(problems)} of {n} shards bad in {out}")
        return 1
    print(f"checksums: all {n} shards OK")
    return 0
