"""glibc allocator settings for processes that move large buffers (the node, job processes)."""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Keep large buffers in the malloc heap (glibc only; a no-op elsewhere).

    Every instance passes through a few ~0.1-1 MB buffers (PDUs, the data set). glibc serves
    those with fresh mmap()s and returns them at free(), so every instance pays ~1000 page
    faults: bench/ingest measured ~1 ms of kernel time per 512² CT instance. With a 64 MiB
    mmap threshold and a 256 MiB trim threshold the same heap memory is reused instead; the
    node's peak RSS is unchanged (the buffers exist either way), it just is not handed back
    and faulted in again between instances.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 64 << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 256 << 20))
