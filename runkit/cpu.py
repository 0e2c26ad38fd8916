"""What CPU this process runs on, read from the OS: the model name and the data caches of one core.

Benchmarks print it beside their figures (a rate means little without the machine), and the CPU
Genesis transforms size their chunks from `core_cache_bytes`. Linux: /sys/devices/system/cpu/cpu0/cache
(`index*/level,type,size,shared_cpu_list`), else os.sysconf(SC_LEVEL*_CACHE_SIZE), else nothing.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class Cache:
    level: int
    kind: str          # Data, Instruction, Unified
    size: int          # bytes
    shared_by: int     # logical CPUs sharing it (1 = private to a core)

    def __str__(self) -> str:
        size = f"{self.size >> 20} MiB" if self.size >= 1 << 20 else f"{self.size >> 10} KiB"
        name = {"Data": "d", "Instruction": "i"}.get(self.kind, "")
        return f"L{self.level}{name} {size}" + (f" (shared by {self.shared_by} CPUs)" if self.shared_by > 1 else "")


def parse_size(text: str) -> int:
    """'2048K' / '48 MiB' / '32768' -> bytes."""
    t = text.strip().replace("iB", "").replace("B", "").replace(" ", "")
    if t and t[-1].upper() in _UNITS:
        return int(float(t[:-1]) * _UNITS[t[-1].upper()])
    return int(t)


def _cpu_count(cpu_list: str) -> int:
    n = 0
    for part in cpu_list.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
    return n


def read_caches(root: Path = SYSFS_CACHE) -> list[Cache]:
    """cpu0's caches from sysfs (L1d, L1i, L2, L3...), or from os.sysconf where sysfs has none."""
    caches = []
    for d in sorted(root.glob("index*")):
        try:
            shared = (d / "shared_cpu_list").read_text() if (d / "shared_cpu_list").exists() else "0"
            caches.append(Cache(int((d / "level").read_text()), (d / "type").read_text().strip(),
                                parse_size((d / "size").read_text()), max(1, _cpu_count(shared))))
        except (OSError, ValueError):
            continue
    if caches:
        return caches
    for level, kind, name in ((1, "Data", "SC_LEVEL1_DCACHE_SIZE"), (2, "Unified", "SC_LEVEL2_CACHE_SIZE"),
                              (3, "Unified", "SC_LEVEL3_CACHE_SIZE")):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if size and size > 0:
            caches.append(Cache(level, kind, int(size), 1))
    return caches


@lru_cache(maxsize=1)
def caches() -> tuple[Cache, ...]:
    return tuple(read_caches())


def core_cache_bytes(cache_list=None) -> int | None:
    """The largest data cache private to one core (usually L2): what one thread's working set should fit.

    None when the OS says nothing about caches.
    """
    own = [c for c in (caches() if cache_list is None else cache_list) if c.kind != "Instruction" and c.shared_by == 1]
    return max((c.size for c in own), default=None)


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> str:
    """One line: model, logical CPUs, caches; e.g. for a benchmark's header."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    cache_text = ", ".join(str(c) for c in caches()) or "caches unknown"
    return f"{cpu_model()}, {cpus} CPUs usable, {cache_text}"
