"""`python -m shards build`: a raw data set -> WebDataset tar shards + manifest.json.

Why it is built this way:
- The scan (cheap, in the main process) fixes the plan: items grouped by split in scan order into
  chunks of --max-count, chunk k of split s being `s-<k:06d>.tar`. One worker builds one whole shard,
  so the bytes never depend on --workers or on scheduling.
- Tar members are deterministic (mtime/uid/gid/mode fixed, `<key>.json` then `<key>.png`, PNG at a
  fixed compress level; with `--encoding raw`, `<key>.npy`: the pixels as they are, their shape also in
  the JSON), every file is written to a temp file and renamed (runkit.atomic), and each
  finished shard gets a sidecar (shards.manifest) with its sha256. A rerun keeps shards whose sidecar
  matches this build and whose bytes match the checksum, and redoes the rest: kill -9 at any point,
  then rerun, gives shards and manifest byte-identical to a clean build.
- `--part i/N`: N machines share one --out (a shared file system); each builds the chunks whose global
  index is i mod N. Whichever part finishes last sees every sidecar and writes manifest.json; a final
  plain run (no --part) also builds anything a failed part left undone and writes the manifest.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import shards
from runkit.atomic import atomic_write
from runkit.errors import UserError
from shards import manifest as mf
from shards.png import encode_png as _encode_png
from shards.record import SPLITS

PNG_COMPRESS_LEVEL = 3
ENCODINGS = ("png", "raw")  # raw: `<key>.npy`, the uint8 (uint16) pixels as numpy's .npy (plain webdataset decodes it)
DEFAULT_MAX_COUNT = 1000
SHARED_MODE = 0o644  # temp files are 0600; shards are read by other users and jobs
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass
class Chunk:
    """One planned shard: the items of one split that go into it, in scan order."""
    index: int  # global index over all chunks, used by --part
    split: str
    number: int  # index within its split, in the file name
    items: list
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return mf.shard_name(self.split, self.number)


@dataclass
class BuildResult:
    out_dir: Path
    planned: int = 0
    written: int = 0
    kept: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    manifest: Path | None = None

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        by_reason = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        where = self.manifest if self.manifest else f"{self.out_dir} (manifest pending: other parts unfinished)"
        return (f"wrote {self.written} shards, kept {self.kept} verified, {self.samples} samples, "
                f"{skipped} skipped" + (f" ({by_reason})" if by_reason else "") + f" -> {where}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, os.PathLike)):
        return str(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable,
                      ensure_ascii=False).encode()


def _split_order(split: str) -> tuple:
    return (SPLITS.index(split), "") if split in SPLITS else (len(SPLITS), split)


def plan_chunks(scan: Iterable, max_count: int, options: dict, progress: bool = True
                ) -> tuple[list[Chunk], list[dict]]:
    """Group scanned items into chunks; return (chunks, skipped entries of the scan)."""
    by_split: dict[str, list] = {}
    skipped: list[dict] = []
    seen: set[str] = set()
    for item in tqdm(scan, desc="scan", unit=" files", disable=not progress, leave=False):
        if hasattr(item, "reason"):  # sources.Skipped
            skipped.append({"name": str(item.name), "reason": str(item.reason), "stage": "scan"})
            continue
        rec = item.record
        if rec.key in seen:
            skipped.append({"name": str(rec.meta.get("path", rec.key)), "reason": f"duplicate key: {rec.key}",
                            "stage": "scan"})
            continue
        seen.add(rec.key)
        if not _SPLIT_RE.match(rec.split or ""):
            raise ValueError(f"source gave record {rec.key} the split {rec.split!r}; want one of {SPLITS}")
        by_split.setdefault(rec.split, []).append(item)
    chunks: list[Chunk] = []
    for split in sorted(by_split, key=_split_order):
        items = by_split[split]
        for number, start in enumerate(range(0, len(items), max_count)):
            chunk = Chunk(len(chunks), split, number, items[start:start + max_count])
            chunk.fingerprint = hashlib.sha256(_json_bytes({
                "version": shards.__version__, "options": options, "name": chunk.name,
                "records": [it.record.to_json() for it in chunk.items]})).hexdigest()
            chunks.append(chunk)
    return chunks, skipped


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what tarfile writes through it."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.f.write(data)
        self.sha.update(data)
        self.n += len(data)
        return len(data)

    def tell(self) -> int:
        return self.n


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def encode_png(image: np.ndarray) -> bytes:
    """A shard's PNG: `shards.png.encode_png` at PNG_COMPRESS_LEVEL (8-bit, or 16-bit with --bit-depth 16)."""
    return _encode_png(image, PNG_COMPRESS_LEVEL)


def encode_npy(image: np.ndarray) -> bytes:
    """A raw shard's pixels: numpy's .npy format 1.0 (a 128-byte header, then the C-order bytes)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(image), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def encode_image(image: np.ndarray, encoding: str) -> tuple[str, bytes]:
    """(tar member extension, bytes) of one image in a shard encoding."""
    if encoding == "raw":
        return "npy", encode_npy(image)
    return "png", encode_png(image)


def pixel_hash(image: np.ndarray) -> str:
    """The duplicate detector's key: sha256 of the preprocessed pixels (shape, dtype, bytes), 32 hex digits.

    Equal after preprocessing means the same picture at training resolution: the same image saved as
    PNG in one data set and as a lossless DICOM or a recompressed JPEG at the same size in another.
    """
    h = hashlib.sha256(f"{image.shape}{image.dtype.str}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:32]


def build_shard(out_dir: str, chunk: Chunk, size: int, square: str, bit_depth: int = 8,
                dedupe_against: tuple[str, ...] = (), encoding: str = "png") -> dict:
    """Build one shard whole (in a worker process) and write its sidecar; return the sidecar."""
    from shards.dedupe import load_hashes
    from shards.preprocess import BadImage, decode_and_preprocess
    from shards.sources import is_frontal

    out = Path(out_dir)
    others = load_hashes(dedupe_against) if dedupe_against else {}
    skipped, records, hashes = [], [], []
    sha = nbytes = None
    pixel_bytes = 0

    def write(f):
        nonlocal sha, nbytes, pixel_bytes
        hw = _HashingWriter(f)
        with tarfile.open(fileobj=hw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for item in chunk.items:
                rec = item.record
                name = str(rec.meta.get("path", rec.key))
                try:
                    data = item.read()
                except Exception as exc:  # noqa: BLE001 - a source's reader (file, tar member) failed
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}"
                    skipped.append({"name": name, "reason": f"unreadable: {reason}"})
                    continue
                try:
                    image, info = decode_and_preprocess(data, size=size, square=square, window=rec.meta.get("window"),
                                                        bit_depth=bit_depth)
                except BadImage as exc:
                    skipped.append({"name": name, "reason": str(exc)})
                    continue
                view = rec.view or info.get("view", "")
                if rec.meta.get("view_filter") == "frontal" and info.get("view") and not is_frontal(info["view"]):
                    skipped.append({"name": name, "reason": f"non-frontal view: {info['view']}"})
                    continue
                digest = pixel_hash(image)
                if digest in others:
                    skipped.append({"name": name, "reason": f"duplicate: same pixels as {others[digest]}"})
                    continue
                meta = {**rec.meta, "preprocess": {**info, "pixel_hash": digest}}
                if "pixel_spacing" in info and "pixel_spacing" not in meta:
                    meta["pixel_spacing"] = info["pixel_spacing"]
                payload = dataclasses.replace(rec, image=None, view=view, meta=meta).to_json()
                if encoding == "raw":  # shape and dtype in the JSON too (the reader parses the .npy header)
                    payload["pixels"] = {"shape": list(image.shape), "dtype": image.dtype.name}
                ext, data = encode_image(image, encoding)
                _add_member(tar, f"{rec.key}.json", _json_bytes(payload))
                _add_member(tar, f"{rec.key}.{ext}", data)
                pixel_bytes += image.nbytes
                records.append(payload)
                hashes.append([rec.key, digest])
        sha, nbytes = hw.sha.hexdigest(), hw.n

    atomic_write(out / chunk.name, write)
    os.chmod(out / chunk.name, SHARED_MODE)
    state = {"name": chunk.name, "split": chunk.split, "count": len(records), "sha256": sha, "bytes": nbytes,
             "pixel_bytes": pixel_bytes, "fingerprint": chunk.fingerprint, "labels": mf.label_counts(records),
             "skipped": skipped, "pixel_hashes": hashes}
    mf.write_sidecar(out, state)
    return state


def _verified_state(out: Path, chunk: Chunk) -> dict | None:
    """The sidecar of a finished shard of this very build whose bytes still match, else None."""
    state = mf.read_sidecar(out, chunk.name)
    if not state or state.get("fingerprint") != chunk.fingerprint:
        return None
    path = out / chunk.name
    try:
        if path.stat().st_size != state["bytes"]:
            return None
    except FileNotFoundError:
        return None
    return state if mf.sha256_file(path) == state["sha256"] else None


def _portable(chunk: Chunk) -> Chunk:
    """Items whose `read` cannot cross a process boundary are read here, in the main process."""
    try:
        pickle.dumps(chunk.items[0].read)
        return chunk
    except (pickle.PicklingError, TypeError, AttributeError):
        return dataclasses.replace(chunk, items=[_Preread(it) for it in chunk.items])


class _Preread:
    """A RawItem stand-in holding the bytes (or the read error) instead of a closure."""

    def __init__(self, item):
        self.record = item.record
        try:
            self.data, self.error = item.read(), None
        except Exception as exc:  # noqa: BLE001 - re-raised in the worker, where it becomes a skip
            self.data, self.error = None, exc

    def read(self) -> bytes:
        if self.error is not None:
            raise self.error
        return self.data


_SHARD_TMP_RE = re.compile(r"^\.[A-Za-z0-9_]+-\d{6}\.(tar|json)\..*\.tmp$")


def _cleanup(out: Path, keep: set[str]) -> None:
    """Remove shards and sidecars of an older plan, and shard temp files left by kill -9.

    Runs only once every planned shard is verified, so no part of this build is still writing one.
    """
    for p in out.iterdir():
        if (mf.SHARD_RE.match(p.name) and p.name not in keep) or _SHARD_TMP_RE.match(p.name):
            p.unlink(missing_ok=True)
    state_dir = out / mf.STATE_DIR
    if state_dir.is_dir():
        wanted = {mf.sidecar_path(out, n).name for n in keep}
        for p in state_dir.iterdir():
            if p.name not in wanted and (p.suffix == ".json" or _SHARD_TMP_RE.match(p.name)):
                p.unlink(missing_ok=True)


def build(scan: Iterable, out_dir: str | Path, *, source: str, size: int = 512, square: str = "crop",
          workers: int = 1, max_count: int = DEFAULT_MAX_COUNT, part: tuple[int, int] | None = None,
          progress: bool = True, start_method: str | None = None, bit_depth: int = 8,
          dedupe_against: Iterable[str | Path] = (), source_options: dict | None = None,
          encoding: str = "png") -> BuildResult:
    """Build (or resume, or build one part of) a shard folder from a source's scan.

    Workers use the platform's default start method unless `start_method` says otherwise; everything
    sent to them pickles, so spawn and forkserver work too (only slower to start).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from shards.dedupe import hash_file_digest

    options = {"size": size, "square": square, "max_count": max_count}
    if encoding not in ENCODINGS:
        raise UserError(f"encoding {encoding!r}: want one of {ENCODINGS}")
    if bit_depth != 8:
        options["bit_depth"] = bit_depth
    if encoding != "png":  # PNG builds keep the options (and so the fingerprints) they had before encodings
        options["encoding"] = encoding
    against = tuple(str(Path(d).resolve()) for d in dedupe_against)
    if against:  # the folders' hash lists are part of the build: a changed list rebuilds the shards
        options["dedupe_against"] = [[Path(d).name, hash_file_digest(d)] for d in against]
    if source_options:
        options["source_options"] = source_options
    chunks, scan_skipped = plan_chunks(scan, max_count, options, progress)
    mine = [c for c in chunks if part is None or c.index % part[1] == part[0]]
    result = BuildResult(out_dir=out, planned=len(chunks))

    states: dict[str, dict] = {}
    todo: list[Chunk] = []
    for chunk in tqdm(mine, desc="verify", unit=" shards", disable=not progress or not mine, leave=False):
        state = _verified_state(out, chunk)
        if state is None:
            todo.append(chunk)
        else:
            states[chunk.name] = state
    result.kept = len(states)

    bar = tqdm(total=sum(len(c.items) for c in todo), desc=f"build {source}", unit=" img",
               disable=not progress, file=sys.stderr)
    if workers <= 1 or len(todo) <= 1:
        for chunk in todo:
            states[chunk.name] = build_shard(str(out), chunk, size, square, bit_depth, against, encoding)
            bar.update(len(chunk.items))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context(start_method)) as pool:
            pending, queue = set(), iter(todo)
            sizes = {}
            while True:
                while len(pending) < 2 * workers:
                    chunk = next(queue, None)
                    if chunk is None:
                        break
                    fut = pool.submit(build_shard, str(out), _portable(chunk), size, square, bit_depth, against,
                                      encoding)
                    sizes[fut] = len(chunk.items)
                    pending.add(fut)
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    state = fut.result()
                    states[state["name"]] = state
                    bar.update(sizes.pop(fut))
    bar.close()
    result.written = len(todo)

    # Merge: every planned shard must have a verified sidecar (ours, or another part's).
    for chunk in chunks:
        if chunk.name not in states:
            state = _verified_state(out, chunk)
            if state is None:
                result.samples = sum(s["count"] for s in states.values())
                result.skipped = Counter(mf.reason_kind(s["reason"]) for st in states.values()
                                         for s in st["skipped"])
                return result
            states[chunk.name] = state
    ordered = [states[c.name] for c in chunks]
    manifest = mf.build_manifest(source=source, options=options, version=shards.__version__,
                                 states=ordered, scan_skipped=scan_skipped)
    from shards.dedupe import duplicate_groups, write_hashes

    pairs = [tuple(p) for st in ordered for p in st.get("pixel_hashes", [])]
    groups = duplicate_groups({out.name: pairs})
    manifest["duplicates"] = {"groups": len(groups), "images": sum(len(g) for g in groups),
                              "first": [[k for _, k in g] for g in groups[:20]]}
    _cleanup(out, {c.name for c in chunks})
    write_hashes(out, pairs)
    result.manifest = mf.write_manifest(out, manifest)
    os.chmod(result.manifest, SHARED_MODE)
    result.samples = manifest["totals"]["samples"]
    result.skipped = Counter(manifest["skipped_by_reason"])
    return result


def parse_part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise UserError(f"--part {text!r}: want i/N with 0 <= i < N, e.g. 0/4")
    return int(m[1]), int(m[2])


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from shards.sources import LABELERS, SOURCE_NAMES, UNCERTAIN_POLICIES, VIEW_FILTERS

    parser.add_argument("source", choices=SOURCE_NAMES, help="raw data set format")
    parser.add_argument("--src", required=True, help="folder of the raw data set")
    parser.add_argument("--out", required=True, help="output folder for <split>-NNNNNN.tar and manifest.json")
    parser.add_argument("--size", type=int, default=512, help="side of the square output images (default 512)")
    parser.add_argument("--square", choices=("crop", "pad"), default="crop", help="center-crop or pad to square")
    parser.add_argument("--workers", type=int, default=_default_workers(), help="processes (default: all cores)")
    parser.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT, help="samples per shard")
    parser.add_argument("--part", default=None, metavar="i/N",
                        help="build only chunks with index %% N == i (N machines, one shared --out); "
                             "the last part to finish, or a plain rerun, writes manifest.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="ignore",
                        help="CheXpert/MIMIC uncertain (-1) labels: ignore (unknown), ones or zeros (default ignore)")
    parser.add_argument("--views", choices=VIEW_FILTERS, default="frontal",
                        help="frontal (PA/AP only, default) or all views")
    parser.add_argument("--labeler", choices=LABELERS, default="chexpert", help="MIMIC-CXR label file (default chexpert)")
    parser.add_argument("--labels", default=None, help="folder source: labels CSV (default <src>/labels.csv)")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8,
                        help="8-bit shards (default) or 16-bit pixels for 12/16-bit sources")
    parser.add_argument("--encoding", choices=ENCODINGS, default="png",
                        help="png (default: ~2-3x smaller on disk) or raw (uint8 pixels as <key>.npy: no decoding, "
                             "several times more images/s per loader core)")
    parser.add_argument("--dedupe-against", nargs="+", default=[], metavar="DIR",
                        help="skip images whose pixels are already in these shard folders")


def _relative(path: str, root: Path) -> str:
    head, sep, member = path.partition(":") if ".tar" in path else (path, "", "")
    try:
        return str(Path(head).resolve().relative_to(root)) + sep + member
    except ValueError:
        return path


def relative_paths(scan: Iterable, src: Path) -> Iterator:
    """Record original paths relative to --src, so shard bytes do not depend on where the data is mounted."""
    from shards.sources import RawItem

    root = src.resolve()
    for item in scan:
        if isinstance(item, RawItem) and item.record.meta.get("path"):
            meta = {**item.record.meta, "path": _relative(str(item.record.meta["path"]), root)}
            item = dataclasses.replace(item, record=dataclasses.replace(item.record, meta=meta))
        yield item


def run(args: argparse.Namespace) -> int:
    from shards.sources import ScanOptions, get_source

    src = Path(args.src)
    if not src.exists():
        raise UserError(f"--src {src}: no such file or folder")
    if args.size < 8:
        raise UserError(f"--size {args.size}: must be at least 8")
    if args.max_count < 1:
        raise UserError(f"--max-count {args.max_count}: must be at least 1")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    part = parse_part(args.part)
    opts = ScanOptions(uncertain=args.uncertain, views=args.views, labeler=args.labeler, labels_csv=args.labels)
    for d in args.dedupe_against:
        if Path(d).resolve() == Path(args.out).resolve():
            raise UserError(f"--dedupe-against {d} is the --out folder itself")
    result = build(relative_paths(get_source(args.source).scan(src, opts), src), args.out, source=args.source,
                   size=args.size, square=args.square, workers=args.workers, max_count=args.max_count, part=part,
                   progress=not args.no_progress, bit_depth=args.bit_depth, dedupe_against=args.dedupe_against,
                   source_options=opts.as_dict(), encoding=args.encoding)
    print(result.summary())
    if result.manifest is not None and result.samples == 0:
        raise UserError(f"no sample could be written from {src}; the skipped inputs and reasons are in "
                        f"{result.manifest}")
    return 0
