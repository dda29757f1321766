"""The buffers an image may be held in, and a file over any of them that copies nothing.

A streamed upload lands in an anonymous memory map, a unary one arrives as bytes; every step that
parses the image (costs.py, image_size.py, decode.py) reads it where it is.
"""

from __future__ import annotations

import io
import mmap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

BufferLike = bytes | bytearray | memoryview | mmap.mmap


class BufferReader(io.RawIOBase):
    """A read-only file over any buffer without copying it (io.BytesIO copies all but bytes)."""

    def __init__(self, data: BufferLike) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        with memoryview(buffer) as target, target.cast("B") as out:
            chunk = self._view[self._pos : self._pos + len(out)]
            size = len(chunk)
            out[:size] = chunk
        self._pos += size
        return size

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = bytes(self._view[self._pos : end])
        self._pos += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._view.release()
        super().close()
