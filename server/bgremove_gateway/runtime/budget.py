"""Admission control: a cap on concurrent streams and a memory budget in bytes.

Each RemoveBackground/StreamRemoveBackground call holds a Ticket for its whole life. It takes a
stream slot when it starts, then reserves memory as it learns what it will need: the declared
upload size when the header arrives, then an estimate of the decoded and re-encoded pixels once
the image header gives width and height (before any pixel is decoded). Beyond the budget a call
is refused at once with RESOURCE_EXHAUSTED and a RetryInfo hint instead of the process growing;
a request that could not fit even into an empty budget is refused without the hint, since
retrying cannot help it.
"""

from __future__ import annotations

import threading
from typing import Final

import grpc

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.errors import BUDGET_RETRY_AFTER_S, ServiceError
from bgremove_gateway.runtime import metrics

# Peak bytes per input pixel from decode through encode (the upload is reserved separately), as
# measured on large photos and rounded up for headroom (docs/decisions/code-memory.md).
BYTES_PER_PIXEL: Final[dict[int, int]] = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: 16,
    pb.OUTPUT_FORMAT_PNG: 16,
    pb.OUTPUT_FORMAT_JPEG: 16,
    pb.OUTPUT_FORMAT_MASK: 10,
    pb.OUTPUT_FORMAT_WEBP: 34,
}
# Model input and mask, protobuf messages and the result's chunks in flight: small but not zero.
PER_REQUEST_OVERHEAD_BYTES: Final = 1 << 20


def image_bytes_estimate(width: int, height: int, fmt: int) -> int:
    return width * height * BYTES_PER_PIXEL.get(fmt, max(BYTES_PER_PIXEL.values()))


class MemoryBudget:
    """Process-wide counters; reservations come from the event loop and from decode's worker
    threads, hence the lock."""

    def __init__(self, memory_budget_bytes: int, max_concurrent_streams: int) -> None:
        if memory_budget_bytes <= 0 or max_concurrent_streams <= 0:
            raise ValueError("the memory budget and the stream cap must be positive")
        self.memory_budget_bytes = memory_budget_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.streams = 0
        self.reserved_bytes = 0
        self.refused = 0
        self._lock = threading.Lock()

    def ticket(self) -> Ticket:
        return Ticket(self)


class Ticket:
    """One call's stream slot and memory; release() returns both (idempotent)."""

    def __init__(self, admission: MemoryBudget) -> None:
        self._admission = admission
        self._in = False
        self._bytes = 0

    @property
    def reserved_bytes(self) -> int:
        return self._bytes

    def enter(self) -> None:
        a = self._admission
        with a._lock:
            if a.streams >= a.max_concurrent_streams:
                a.refused += 1
                metrics.admission_refused("streams")
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many concurrent streams: {a.streams} open, the limit is "
                    f"{a.max_concurrent_streams}; retry in {BUDGET_RETRY_AFTER_S:g} s",
                    retry_after_s=BUDGET_RETRY_AFTER_S,
                )
            a.streams += 1
            self._in = True
        self.reserve(PER_REQUEST_OVERHEAD_BYTES, "a request")

    def fits(self, nbytes: int, what: str) -> None:
        """Refuses the call now if `nbytes` more could never fit, even into an empty budget."""
        a = self._admission
        with a._lock:
            self._refuse_if_never_fits(nbytes, what)

    def _refuse_if_never_fits(self, nbytes: int, what: str) -> None:
        a = self._admission
        if self._bytes + nbytes > a.memory_budget_bytes:
            a.refused += 1
            metrics.admission_refused("never_fits")
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{what} needs about {self._bytes + nbytes} bytes of gateway memory, more than "
                f"its whole memory budget of {a.memory_budget_bytes} bytes",
            )

    def reserve(self, nbytes: int, what: str) -> None:
        """Adds `nbytes` to this call's share of the budget, or refuses the call."""
        a = self._admission
        with a._lock:
            self._refuse_if_never_fits(nbytes, what)
            if a.reserved_bytes + nbytes > a.memory_budget_bytes:
                a.refused += 1
                metrics.admission_refused("memory")
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the gateway is at its memory budget: {what} needs {nbytes} bytes, "
                    f"{a.memory_budget_bytes - a.reserved_bytes} of {a.memory_budget_bytes} are free; "
                    f"retry in {BUDGET_RETRY_AFTER_S:g} s",
                    retry_after_s=BUDGET_RETRY_AFTER_S,
                )
            a.reserved_bytes += nbytes
            self._bytes += nbytes

    def release(self) -> None:
        a = self._admission
        with a._lock:
            a.reserved_bytes -= self._bytes
            self._bytes = 0
            if self._in:
                a.streams -= 1
                self._in = False
