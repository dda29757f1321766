"""Image buffers are reused while the gateway is busy and given back to the OS once it is idle.

Two costs pull against each other. A buffer the allocator hands out from memory it already holds
is fast; a fresh mapping page-faults on every 4 KiB page as the image is written into it, which
nearly doubled the gateway's CPU work on a photo with glibc's default 1 MiB mmap threshold.
Keeping buffers in the allocator's arenas, on the other hand, keeps the memory of a burst after it
ends (figures in docs/decisions/code-memory.md).

So buffers up to ARENA_MAX_BUFFER_BYTES (an 8 MP RGBA image) stay in the arenas and are reused hot,
glibc does not trim them back mid-burst, and IdleTrim calls malloc_trim once no request has been
in flight for a moment. Larger buffers are mapped and unmapped as before: they are rare, and the
page faults are small next to the work on such an image.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
from collections.abc import Callable
from typing import Final

log = logging.getLogger("bgremove.gateway")

_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
ARENA_MAX_BUFFER_BYTES: Final = 32 * 1024 * 1024
# Free memory at the top of an arena is kept up to this much; IdleTrim returns it all when idle.
TRIM_THRESHOLD_BYTES: Final = 1024 * 1024 * 1024
IDLE_TRIM_DELAY_S: Final = 0.3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def configure_allocator() -> bool:
    """Sets glibc's thresholds as described above; False where the C library has no mallopt
    (e.g. musl), which leaves its own defaults."""
    libc = _libc()
    if libc is None:
        log.info("no glibc mallopt/malloc_trim: freed image buffers are returned as the C library sees fit")
        return False
    # Fixed values also turn off glibc's dynamic adjustment of both thresholds.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, ARENA_MAX_BUFFER_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def malloc_trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class IdleTrim:
    """Counts calls in flight; `delay_s` after the last one ends with none started since, runs
    `trim` in a worker thread. A steady stream of requests never waits for it, and a burst's memory
    goes back soon after the burst. Used from the event loop only."""

    def __init__(self, delay_s: float = IDLE_TRIM_DELAY_S, trim: Callable[[], None] = malloc_trim) -> None:
        self.delay_s = delay_s
        self.in_flight = 0
        self.trims = 0
        self._trim = trim
        self._timer: asyncio.TimerHandle | None = None

    def enter(self) -> None:
        self.in_flight += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._timer = asyncio.get_running_loop().call_later(self.delay_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.in_flight == 0:
            self.trims += 1
            asyncio.get_running_loop().run_in_executor(None, self._trim)
