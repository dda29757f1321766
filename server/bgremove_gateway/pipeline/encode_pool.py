"""Large PNG and WebP encodes in worker processes, so they never hold the gateway's GIL.

fpng and Pillow's WebP encoder keep the GIL for their whole run. From a worker thread that still
stops the event loop and every other thread for as long as the encode takes. Above MIN_PIXELS the
pixels therefore go to a small process pool; the parent only copies them, in bands, into shared
memory. Smaller images stay in-process: their encode holds the GIL for less time than the handoff
would cost. The figures behind this are in docs/decisions/code-encoding.md.

The workers start with the gateway (never in the middle of serving). Pixels and file pass through
shared-memory blocks (in /dev/shm, which is memory) that the parent unlinks as soon as it has read
them: nothing touches the disk. Where /dev/shm has no room (the chart mounts a memory volume there;
a bare container has 64 MiB), or a worker dies (killed for memory, say), the call in hand is
encoded in-process, and a dead worker's pool is replaced for the next ones.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.pipeline.encode import Encoded, encode_image, encode_rgba_png
from bgremove_gateway.pipeline.postprocess import Cutout

log = logging.getLogger("bgremove.gateway")

MIN_PIXELS: Final = 2_000_000
COPY_BAND_BYTES: Final = 2 << 20
# The formats whose encoders hold the GIL; JPEG and the greyscale MASK (Pillow's PNG) do not.
RGBA_PNG_FORMATS: Final = frozenset({pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_UNSPECIFIED})
GIL_HOLDING_FORMATS: Final = RGBA_PNG_FORMATS | {pb.OUTPUT_FORMAT_WEBP}


def reserve(size: int) -> shared_memory.SharedMemory | None:
    """A shared-memory block of `size` bytes with every page reserved now, or None where /dev/shm
    has no room (a container's default is 64 MiB). Reserving up front turns a full /dev/shm into
    this None instead of a SIGBUS halfway through writing the pixels."""
    try:
        block = shared_memory.SharedMemory(create=True, size=size)
    except OSError:
        return None
    try:
        os.posix_fallocate(block._fd, 0, size)  # type: ignore[attr-defined]
    except OSError:
        block.close()
        block.unlink()
        return None
    return block


def _encode_shared(name: str, size: tuple[int, int], mode: str, fmt: int) -> tuple[str, bytes, str]:
    """Runs in a worker process: encodes the pixels in the parent's shared-memory block `name`.
    Returns (block name, "", media type) with the file in a new block for the parent to read and
    unlink, or ("", file, media type) when /dev/shm has no room for it."""
    pixels_shm = shared_memory.SharedMemory(name=name)
    try:
        width, height = size
        pixels: npt.NDArray[np.uint8] = np.ndarray(
            (height, width, len(mode)), np.uint8, buffer=pixels_shm.buf
        )
        if fmt in RGBA_PNG_FORMATS:
            encoded = encode_rgba_png(pixels)
        else:
            encoded = encode_image(Image.fromarray(pixels, mode), fmt)  # type: ignore[arg-type]
        del pixels  # a live view of the block would keep close() from unmapping it
    finally:
        pixels_shm.close()
    out = reserve(len(encoded.data))
    if out is None:
        return "", encoded.data, encoded.content_type
    buf = out.buf
    assert buf is not None
    buf[: len(encoded.data)] = encoded.data
    del buf
    out.close()
    return out.name, b"", encoded.content_type


def _ready() -> bool:
    return True


def _take(name: str) -> bytes:
    """The bytes of a worker's block, which is then unlinked."""
    block = shared_memory.SharedMemory(name=name)
    try:
        buf = block.buf
        assert buf is not None
        data = bytes(buf)
        del buf
    finally:
        block.close()
        block.unlink()
    return data


class EncodePool:
    def __init__(self, workers: int, min_pixels: int = MIN_PIXELS) -> None:
        if workers < 1:
            raise ValueError("an encode pool needs at least one worker")
        self.workers = workers
        self.min_pixels = min_pixels
        self.remote_encodes = 0
        self.restarts = 0
        self.no_room = 0  # encodes done in-process because /dev/shm was full
        self.pending = 0  # handed to the workers, not finished: the pool's queue (a metric)
        # spawn: not fork, since the gateway has gRPC's and the pools' threads running, and not
        # forkserver, which needs a writable temporary directory (the chart's root filesystem is
        # read-only).
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self._context)

    def start(self) -> None:
        """Starts every worker now (blocking: call it off the event loop)."""
        with self._lock:
            pool = self._pool
        futures = [pool.submit(_ready) for _ in range(self.workers)]
        for future in futures:
            future.result()

    def wants(self, cutout: Cutout, fmt: int) -> bool:
        width, height = cutout.image.size
        return fmt in GIL_HOLDING_FORMATS and width * height >= self.min_pixels

    def encode(self, cutout: Cutout, fmt: pb.OutputFormat) -> Encoded:
        """Like encode.encode(); blocking, for a worker thread."""
        if not self.wants(cutout, fmt):
            return encode_image(cutout.image, fmt)
        with self._lock:
            pool = self._pool
        image = cutout.image
        width, height = image.size
        row_bytes = width * len(image.mode)
        # Shared memory (/dev/shm: memory, not disk) rather than the pool's pipe: pickling the
        # pixels through a pipe took longer than the encode itself.
        pixels_shm = reserve(row_bytes * height)
        if pixels_shm is None:
            self.no_room += 1
            return encode_image(image, fmt)
        try:
            buf = pixels_shm.buf
            assert buf is not None
            # In bands: each copy holds the GIL, and one 48 MB copy would be a stall of its own.
            band = max(1, COPY_BAND_BYTES // row_bytes)
            for top in range(0, height, band):
                rows = image.crop((0, top, width, min(height, top + band))).tobytes()
                buf[top * row_bytes : top * row_bytes + len(rows)] = rows
            del buf
            with self._lock:
                self.pending += 1
            try:
                out_name, data, content_type = pool.submit(
                    _encode_shared, pixels_shm.name, image.size, image.mode, fmt
                ).result()
            finally:
                with self._lock:
                    self.pending -= 1
            if out_name:
                data = _take(out_name)
            result = Encoded(data=data, content_type=content_type)
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    log.error("an encode worker process died; starting a fresh encode pool")
                    self._pool = self._new_pool()
                    self.restarts += 1
            return encode_image(cutout.image, fmt)
        finally:
            pixels_shm.close()
            pixels_shm.unlink()
        self.remote_encodes += 1
        return result

    def shutdown(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=False, cancel_futures=True)
