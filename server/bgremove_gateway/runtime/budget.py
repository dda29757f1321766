"""Admission control: a cap on concurrent streams and a memory budget in bytes.

Each RemoveBackground/StreamRemoveBackground call holds a Ticket for its whole life. It takes a
stream slot when it starts, then reserves memory as it learns what it will need: the declared
upload size when the header arrives, then an estimate of the decoded and re-encoded pixels once
the image header gives width and height (before any pixel is decoded). Beyond the budget a call
is refused at once with RESOURCE_EXHAUSTED and a RetryInfo hint instead of the process growing;
a request that could not fit even into an empty budget is refused without the hint, since
retrying cannot help it. With --workers the budget and the cap are the pod's: the workers count in
one shared table (shared_budget.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Final

import grpc

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.errors import BUDGET_RETRY_AFTER_S, ServiceError
from bgremove_gateway.runtime import metrics
from bgremove_gateway.runtime.shared_budget import AdmissionTable

# Peak bytes per input pixel from decode through encode (the upload is reserved separately), as
# measured on large photos and rounded up for headroom (docs/decisions/code-memory.md).
BYTES_PER_PIXEL: Final[dict[int, int]] = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: 16,
    pb.OUTPUT_FORMAT_PNG: 16,
    pb.OUTPUT_FORMAT_JPEG: 16,
    pb.OUTPUT_FORMAT_MASK: 10,
    pb.OUTPUT_FORMAT_WEBP: 34,
    # Measured 10.5 on a 12 MP photo (no fpng buffer); PNG's figure kept for headroom.
    pb.OUTPUT_FORMAT_ZIP: 16,
}
# Added by Options.scale_percent / position: a second canvas (RGBX + matte) and the resized subject;
# measured 14 in all (not 16 + 10: the peaks do not coincide) for a small subject scaled to fill 12 MP.
MOVED_SUBJECT_BYTES_PER_PIXEL: Final = 10
# Added by a background (bg_image, or bg_color on PNG/WebP): the backdrop at the canvas size, the
# composite and its RGBA copy; measured +2 (bg_color, PNG) and +6 (a 12 MP bg_image, PNG, its
# decode included) on a 12 MP photo.
BACKGROUND_BYTES_PER_PIXEL: Final = 6
# Options.bg_image's own decode, per background pixel: its RGBX pixels and a flattened RGB copy.
BG_IMAGE_BYTES_PER_PIXEL: Final = 8
# Model input and mask, protobuf messages and the result's chunks in flight: small but not zero.
PER_REQUEST_OVERHEAD_BYTES: Final = 1 << 20


def image_bytes_estimate(width: int, height: int, fmt: int, options: pb.Options | None = None) -> int:
    """Peak bytes of a width x height input from decode through encode, for `options` when given
    (the canvas a moved subject or a background needs)."""
    per_pixel = BYTES_PER_PIXEL.get(fmt, max(BYTES_PER_PIXEL.values()))
    if options is not None:
        if options.scale_percent or options.position.placement not in (
            pb.PLACEMENT_UNSPECIFIED,
            pb.PLACEMENT_ORIGINAL,
        ):
            per_pixel += MOVED_SUBJECT_BYTES_PER_PIXEL
        if options.bg_image or (options.HasField("bg_color") and fmt != pb.OUTPUT_FORMAT_MASK):
            per_pixel += BACKGROUND_BYTES_PER_PIXEL
    return width * height * per_pixel


def bg_image_bytes_estimate(width: int, height: int) -> int:
    """Peak bytes of decoding a width x height Options.bg_image (its cover-resized copy is counted
    in image_bytes_estimate)."""
    return width * height * BG_IMAGE_BYTES_PER_PIXEL


def share(total: int, parts: int, index: int) -> int:
    """Part `index` of `total` split as evenly as whole numbers allow among `parts` processes (the
    first ones get the remainder), so the parts add up to `total` exactly: a pod-wide count such as
    --cpu-workers split among several gateway processes (--workers)."""
    if not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts} does not exist")
    return total // parts + (1 if index < total % parts else 0)


class MemoryBudget:
    """Admission's counters: this process's alone, or with `table` and `slot` the pod's (--workers),
    shared by every worker (shared_budget.py). Reservations come from the event loop and from
    decode's worker threads, hence the in-process lock, taken before the pod's."""

    def __init__(
        self,
        memory_budget_bytes: int,
        max_concurrent_streams: int,
        table: AdmissionTable | None = None,
        slot: int = 0,
    ) -> None:
        if memory_budget_bytes <= 0 or max_concurrent_streams <= 0:
            raise ValueError("the memory budget and the stream cap must be positive")
        self.memory_budget_bytes = memory_budget_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.refused = 0
        self._table = table
        self._slot = slot
        self._streams = 0
        self._reserved_bytes = 0
        self._lock = threading.Lock()

    @property
    def streams(self) -> int:
        """Streams open now: the pod's with a shared table."""
        return self._streams if self._table is None else self._table.totals()[1]

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved now: the pod's with a shared table."""
        return self._reserved_bytes if self._table is None else self._table.totals()[0]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[int, int]]:
        """Holds the counters still, and gives (bytes reserved, streams open) as they are."""
        with self._lock:
            if self._table is None:
                yield self._reserved_bytes, self._streams
            else:
                with self._table.locked():
                    yield self._table.totals()

    def _add(self, nbytes: int, streams: int) -> None:
        """Changes this process's counters (and its slot); call it under _locked()."""
        self._reserved_bytes += nbytes
        self._streams += streams
        if self._table is not None:
            self._table.add(self._slot, nbytes, streams)

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
        with a._locked() as (_, streams):
            if streams >= a.max_concurrent_streams:
                a.refused += 1
                metrics.admission_refused("streams")
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many concurrent streams: {streams} open, the limit is "
                    f"{a.max_concurrent_streams}; retry in {BUDGET_RETRY_AFTER_S:g} s",
                    retry_after_s=BUDGET_RETRY_AFTER_S,
                )
            a._add(0, 1)
            self._in = True
        self.reserve(PER_REQUEST_OVERHEAD_BYTES, "a request")

    def fits(self, nbytes: int, what: str) -> None:
        """Refuses the call now if `nbytes` more could never fit, even into an empty budget."""
        with self._admission._lock:
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
        with a._locked() as (reserved, _):
            self._refuse_if_never_fits(nbytes, what)
            if reserved + nbytes > a.memory_budget_bytes:
                a.refused += 1
                metrics.admission_refused("memory")
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the gateway is at its memory budget: {what} needs {nbytes} bytes, "
                    f"{a.memory_budget_bytes - reserved} of {a.memory_budget_bytes} are free; "
                    f"retry in {BUDGET_RETRY_AFTER_S:g} s",
                    retry_after_s=BUDGET_RETRY_AFTER_S,
                )
            a._add(nbytes, 0)
            self._bytes += nbytes

    def release(self) -> None:
        a = self._admission
        if not (self._bytes or self._in):
            return
        with a._locked():
            a._add(-self._bytes, -1 if self._in else 0)
            self._bytes = 0
            self._in = False
