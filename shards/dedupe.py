"""`python -m shards dedupe DIR [DIR ...]`: images that appear in several shard folders (or twice in one).

Every build writes `<shards>/pixel-hashes.tsv` (`key<TAB>hash`, one line per sample): the sha256 of
the preprocessed pixels (`shards.writer.pixel_hash`). Public chest X-ray sets reuse each other's
images (the COVID-19 Radiography Database holds ieee8023 images, for example), and an image that is
in two sources would be seen twice per epoch of a mixture, or leak from one source's train split into
another's test split.

- Report: this command lists every group of equal hashes across the given folders (and within each),
  and `--json FILE` writes them. Exit 0 whether or not duplicates exist; 2 on a missing hash list.
- Keep one copy: build the later source with `python -m shards build ... --dedupe-against DIR ...`;
  its images whose pixels equal an image in those folders become skips with the reason
  `duplicate: same pixels as <folder>/<key>` in its manifest. The manifest of every build also
  counts the duplicates inside the source (`duplicates`).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from runkit.atomic import atomic_write_text
from runkit.errors import UserError

HASH_FILE = "pixel-hashes.tsv"


def write_hashes(out: Path, pairs: Iterable[tuple[str, str]]) -> Path:
    text = "".join(f"{k}\t{h}\n" for k, h in sorted(pairs))
    return atomic_write_text(Path(out) / HASH_FILE, text)


def read_hashes(folder: str | Path) -> list[tuple[str, str]]:
    path = Path(folder) / HASH_FILE
    if not path.is_file():
        raise UserError(f"no {HASH_FILE} in {folder}: rebuild it with this version of `python -m shards build`")
    out = []
    for line in path.read_text().splitlines():
        key, _, digest = line.partition("\t")
        if key and digest:
            out.append((key, digest))
    return out


def hash_file_digest(folder: str | Path) -> str:
    path = Path(folder) / HASH_FILE
    if not path.is_file():
        raise UserError(f"--dedupe-against {folder}: no {HASH_FILE} there (is it a finished shard folder?)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=4)
def load_hashes(folders: tuple[str, ...]) -> dict[str, str]:
    """hash -> '<folder name>/<key>' (the first in folder order, then key order); cached per worker."""
    out: dict[str, str] = {}
    for folder in folders:
        for key, digest in sorted(read_hashes(folder)):
            out.setdefault(digest, f"{Path(folder).name}/{key}")
    return out


def duplicate_groups(by_folder: dict[str, list[tuple[str, str]]]) -> list[list[tuple[str, str]]]:
    """Groups of (folder, key) with equal hashes, each sorted, groups sorted by their first member."""
    members: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for folder, pairs in by_folder.items():
        for key, digest in pairs:
            members[digest].append((folder, key))
    return sorted((sorted(g) for g in members.values() if len(g) > 1), key=lambda g: g[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", help="shard folders (each with pixel-hashes.tsv)")
    parser.add_argument("--json", default=None, help="write the duplicate groups to this JSON file")


def run(args: argparse.Namespace) -> int:
    names = [str(Path(d)) for d in args.dirs]
    groups = duplicate_groups({d: read_hashes(d) for d in names})
    cross = [g for g in groups if len({f for f, _ in g}) > 1]
    for g in groups:
        print("duplicate: " + "  ".join(f"{f}/{k}" for f, k in g))
    print(f"{len(groups)} duplicate groups ({sum(len(g) for g in groups)} images), "
          f"{len(cross)} across folders, in {len(names)} folders")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(
            {"groups": [[{"folder": f, "key": k} for f, k in g] for g in groups],
             "cross_folder_groups": len(cross)}, indent=1) + "\n")
        print(f"report -> {args.json}")
    return 0
