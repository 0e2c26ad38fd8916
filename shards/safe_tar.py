"""Read images straight out of tar(.gz) archives without extracting anything, safely.

The official NIH release is 12 `images_0XX.tar.gz` files (~45 GB); extracting them doubles the disk
needed, and extracting an archive from the internet is a classic path-traversal hole. So nothing here
ever writes to disk: `scan_tar` walks the headers once and returns where each regular file's bytes
lie; `read_member` reads them back later (in any process) from a per-process cached stream.

Policy: a hostile or odd member is rejected on its own, as a `Skipped` with a reason, and the rest
of the archive stays usable (one bad header in a 4 GB archive should not discard 9,000 images).
Rejected: absolute paths, '..' components, NUL or backslash tricks, symlinks, hard links, device
files, FIFOs, sparse files, members over MAX_MEMBER_BYTES and duplicate names. Directories are not
inputs and are ignored. An archive that is not a tar, or is corrupt or truncated, yields one Skipped
for the archive (after the members read before the damage).

Reading a gzip member needs decompressing from the start, so `read_member` keeps one open stream
per archive per process and seeks forward: reading members in archive order (keys are sorted, and
NIH archives are sorted by name) costs one sequential pass per archive per process.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shards.sources import Skipped

MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a chest X-ray is never this big; a tar bomb member might be
_MAX_OPEN = 16
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, lzma.LZMAError, ValueError)


@dataclass(frozen=True)
class TarEntry:
    name: str          # member path inside the archive, as stored
    offset_data: int   # byte offset of its data in the uncompressed tar stream
    size: int


def member_problem(m: tarfile.TarInfo) -> str | None:
    """Why a member must not be used, or None for a safe regular file (directories: 'directory')."""
    name = m.name
    if not name or "\0" in name:
        return "unsafe path (empty or NUL)"
    if name.startswith(("/", "\\")) or len(name) > 1 and name[1] == ":":
        return "unsafe path (absolute)"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "unsafe path (..)"
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hard link"
    if m.ischr() or m.isblk():
        return "device file"
    if m.isfifo():
        return "fifo"
    if m.isdir():
        return "directory"
    if m.issparse():
        return "sparse member"
    if not m.isreg():
        return "not a regular file"
    if m.size > MAX_MEMBER_BYTES:
        return f"member too large ({m.size} bytes)"
    return None


def scan_tar(path: Path | str) -> Iterator[TarEntry | Skipped]:
    """Every regular, safe member as a TarEntry; every unsafe one as Skipped("archive:member", reason)."""
    path = Path(path)
    seen: set[str] = set()
    count = 0
    try:
        with tarfile.open(path, mode="r:*") as tf:
            while True:
                m = tf.next()
                if m is None:
                    break
                tf.members = []  # no need to keep 9,000 headers per archive in memory
                label = f"{path.name}:{m.name}"
                problem = member_problem(m)
                if problem == "directory":
                    continue
                if problem:
                    yield Skipped(label, problem)
                    continue
                name = str(PurePosixPath(m.name))  # "./images/a.png" -> "images/a.png"
                if name in seen:
                    yield Skipped(label, "duplicate member")
                    continue
                seen.add(name)
                count += 1
                yield TarEntry(name, m.offset_data, m.size)
    except _ARCHIVE_ERRORS as exc:
        what = "not a tar archive" if count == 0 and isinstance(exc, tarfile.ReadError) else "corrupt archive"
        yield Skipped(path.name, f"{what} after {count} members ({type(exc).__name__}: {exc})"[:200])


# ----------------------------------------------------------------------------- reading members

_lock = threading.Lock()
_streams: OrderedDict[str, object] = OrderedDict()
_streams_pid = None


def _open_stream(path: str):
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


def read_member(archive: str, offset_data: int, size: int) -> bytes:
    """The bytes of one member; OSError when the archive ends early or cannot be read."""
    global _streams_pid
    with _lock:
        if _streams_pid != os.getpid():  # a forked worker must not share the parent's file positions
            _streams.clear()
            _streams_pid = os.getpid()
        stream = _streams.pop(archive, None)
        try:
            if stream is None:
                stream = _open_stream(archive)
            stream.seek(offset_data)
            data = stream.read(size)
        except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
            if stream is not None:
                stream.close()
                stream = None
            raise OSError(f"cannot read {archive} at {offset_data}: {exc}") from None
        finally:
            if stream is not None:
                _streams[archive] = stream
                while len(_streams) > _MAX_OPEN:
                    _streams.popitem(last=False)[1].close()
        if len(data) != size:
            raise OSError(f"{archive} ends inside a member at {offset_data} ({len(data)} of {size} bytes)")
        return data
