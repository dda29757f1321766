"""Large PNG and WebP encodes in worker processes, so they never hold the gateway's GIL.

fpng and Pillow's WebP encoder keep the GIL for their whole run. From a worker thread that still
stops the event loop and every other thread: measured here on a 12 MP cut-out, the loop went 172 ms
without running (fpng) and 76 ms (lossless WebP), against 7 ms for Pillow's own PNG encoder, which
lets go of the GIL but takes 745 ms. Above MIN_PIXELS the pixels therefore go to a small process
pool; the parent only copies them into the pipe (about 1 ms per megapixel with the GIL held).
Smaller images stay in-process: a 1 MP fpng encode holds the GIL about 5 ms, less than the
handoff would cost.

The workers start with the gateway (never in the middle of serving) and read the pixels from a
shared-memory block (in /dev/shm, which is memory) that the parent unlinks as soon as the encode
returns: nothing touches the disk. A worker that dies (killed for memory, say) breaks the pool; the
call in hand is then encoded in-process and the next ones get a fresh pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.encode import Encoded, encode_image, encode_rgba_png
from bgremove_gateway.postprocess import Cutout

log = logging.getLogger("bgremove.gateway")

MIN_PIXELS: Final = 2_000_000
COPY_BAND_BYTES: Final = 2 << 20
# The formats whose encoders hold the GIL; JPEG and the greyscale MASK (Pillow's PNG) do not.
RGBA_PNG_FORMATS: Final = frozenset({pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_UNSPECIFIED})
GIL_HOLDING_FORMATS: Final = RGBA_PNG_FORMATS | {pb.OUTPUT_FORMAT_WEBP}


def _encode_shared(
    pixels_name: str, out_name: str, size: tuple[int, int], mode: str, fmt: int
) -> tuple[int, str]:
    """Runs in a worker process: encodes the pixels in shared memory `pixels_name` and writes the
    file into `out_name`; returns its length and media type. Both blocks are the parent's."""
    pixels_shm = shared_memory.SharedMemory(name=pixels_name)
    out_shm = shared_memory.SharedMemory(name=out_name)
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
        data, out = encoded.data, out_shm.buf
        assert out is not None
        out[: len(data)] = data
        del out
        return len(data), encoded.content_type
    finally:
        pixels_shm.close()
        out_shm.close()


def _ready() -> bool:
    return True


class EncodePool:
    def __init__(self, workers: int, min_pixels: int = MIN_PIXELS) -> None:
        if workers < 1:
            raise ValueError("an encode pool needs at least one worker")
        self.workers = workers
        self.min_pixels = min_pixels
        self.remote_encodes = 0
        self.restarts = 0
        # forkserver, not fork: the gateway has gRPC's and the pools' threads running.
        self._context = multiprocessing.get_context("forkserver")
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
        # Shared memory (/dev/shm: memory, not disk) both ways rather than the pool's pipe:
        # pickling 48 MB of pixels through a pipe took ~200 ms here, more than the encode itself.
        # The output block is sized for the worst case; only the pages written are ever backed.
        size = row_bytes * height
        pixels_shm = shared_memory.SharedMemory(create=True, size=size)
        out_shm = shared_memory.SharedMemory(create=True, size=size + size // 8 + (1 << 20))
        try:
            buf = pixels_shm.buf
            assert buf is not None
            # In bands: each copy holds the GIL, and one 48 MB copy would be a stall of its own.
            band = max(1, COPY_BAND_BYTES // row_bytes)
            for top in range(0, height, band):
                rows = image.crop((0, top, width, min(height, top + band))).tobytes()
                buf[top * row_bytes : top * row_bytes + len(rows)] = rows
            del buf
            length, content_type = pool.submit(
                _encode_shared, pixels_shm.name, out_shm.name, image.size, image.mode, fmt
            ).result()
            out = out_shm.buf
            assert out is not None
            result = Encoded(data=bytes(out[:length]), content_type=content_type)
            del out
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    log.error("an encode worker process died; starting a fresh encode pool")
                    self._pool = self._new_pool()
                    self.restarts += 1
            return encode_image(cutout.image, fmt)
        finally:
            for shm in (pixels_shm, out_shm):
                shm.close()
                shm.unlink()
        self.remote_encodes += 1
        return result

    def shutdown(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=False, cancel_futures=True)
