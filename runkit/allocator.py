"""Keep freed memory in the process heap, so that per-step tensors of a CPU job do not page-fault.

glibc returns every freed block over its mmap threshold to the kernel and maps fresh, zeroed pages
for the next one: a CPU training step that allocates a few batch-sized tensors (the Models Genesis
corruptions, activations) spends 10-20 % of its time in page faults. Raising the mmap and trim
thresholds makes glibc reuse those blocks, as jemalloc or tcmalloc would (PyTorch's CPU tuning guide
suggests either); on CUDA the caching allocator already does this. It changes nothing but where freed
memory goes: a no-op where glibc is not the C library.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc's upper bound for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks up to 32 MiB
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True when glibc took them."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
